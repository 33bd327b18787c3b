"""Verified computation: a client spot-checks what its shard servers compute.

A server can return any finite activations, and nothing in the protocol can tell them from
honest ones. So the client recomputes: at a random ``fraction`` of tokens, at the first
(which covers the prompt) and at the last, it has an *auditor*, a session on another server
for exactly the same blocks, catch up on each hop's inputs (the boundary histories the
client keeps anyway; steps sent a few ahead, as pushes into its own session) and compares
the auditor's outputs with what the hop sent, within a tolerance fitted to the arithmetic
in use. Shard graphs are bit-identical to the whole model on the same runtime, so the
tolerance only has to cover thread counts, float16 on the wire and int8 kernels. The
session holds tokens back until a check has covered them, and a ring stops at each check,
so servers never run ahead of one.

An auditor is fed every position in order (it needs the KV cache of every earlier
position anyway), so every hidden state a hop sent before a check is compared, not only
the sampled step's: a server that corrupts one step in fifty is caught at the first check
after it. A last hop sends logits of a step's last position only, so its auditor runs the
positions whose token the model picked one at a time and checks each token against its
own logits (greedy: the token's logit within the tolerance of the best; sampled: the same
pick from the same seed).

A mismatch is blamed on the hop whose output differs (an honest hop fed corrupted input
agrees with its auditor, which is fed the same input), and kept as :class:`Evidence`.
Before the hop is banned a referee, a third server for the blocks, recomputes the disputed
position from the evidence's inputs: if it sides with the hop, the auditor is dropped
instead. With no third server the auditor's word stands, so a hostile auditor can then
cost an honest server this client's routes, no more; an auditor colluding with the hop it
checks is not caught.
"""

from __future__ import annotations

import itertools
import logging
import math
import random
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import trio

from p2pedge.errors import PeerTimeout, ShardFailed
from p2pedge.ids import LayerRange
from p2pedge.planning.routes import ServerOption
from p2pedge.planning.verification import VerifyPolicy, first_mismatch
from p2pedge.protocols.pipeline.attest import Attested, check_attested
from p2pedge.protocols.pipeline.chain import HOP_ERRORS, ClientConfig, History, HopState
from p2pedge.protocols.pipeline.connection import ShardConnection, StreamOpener
from p2pedge.protocols.pipeline.sampling import Sampler
from p2pedge.records.peer_ids import ed25519_from_peer_id

log = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class Evidence:
    """What a check found: the blamed peer's output, the auditor's, and the inputs that
    produced them (the hop's input at every position up to the bad one, so anyone holding
    the blocks can recompute it)."""

    peer: str
    auditor: str
    model: str
    layers: LayerRange
    position: int
    inputs: npt.NDArray[Any]
    served: npt.NDArray[Any]
    recomputed: npt.NDArray[Any]
    detail: str
    found_at: float = 0.0  # trio time of the check that found it
    # the server's signed output covering ``position`` (see attest.py): proof to anyone of
    # what it sent for which inputs; None when the server does not sign
    attested: Attested | None = None

    @property
    def signature(self) -> bytes:
        return self.attested.signature if self.attested is not None else b""

    def proof(self) -> str | None:
        """What keeps the evidence from proving what the server sent (None: it proves it)."""
        if self.attested is None:
            return "the server did not sign its outputs"
        return check_attested(self.attested, ed25519_from_peer_id(self.peer))


@dataclass(frozen=True)
class Mismatch:
    hop: int
    position: int
    evidence: Evidence


def token_agrees(
    token: int, logits: npt.NDArray[Any], sampler: Sampler, position: int, atol: float, rtol: float
) -> bool:
    """Whether ``token`` is what ``sampler`` picks from ``logits`` (greedy: allowing a near
    tie within the tolerance, which float noise may break either way)."""
    row = np.asarray(logits, dtype=np.float32).reshape(-1)
    if not 0 <= token < row.size:
        return False
    if sampler.spec.greedy:
        best = float(row.max())
        return bool(row[token] >= best - (atol + rtol * abs(best)))
    return sampler(row[None], position) == token


Finder = Callable[[], Awaitable[list[ServerOption]]]
WINDOW = 4  # steps sent ahead to an auditor


@dataclass
class Auditor:
    conn: ShardConnection
    done: int = 0  # positions of the hop's input it has consumed


@dataclass
class Audits:
    """The auditors of one sharded session and what their checks found."""

    policy: VerifyPolicy
    opener: StreamOpener
    find_options: Finder
    model: str
    config: ClientConfig
    rng: random.Random = field(init=False)
    auditors: dict[ShardConnection, Auditor] = field(default_factory=dict)  # by hop
    unusable: set[str] = field(default_factory=set)  # peers that failed as auditors
    alone: set[ShardConnection] = field(default_factory=set)  # hops nobody else serves
    evidence: list[Evidence] = field(default_factory=list)
    checks: int = 0
    refuted: int = 0  # auditors a referee contradicted (dropped, their hops checked afresh)
    compared: int = 0  # hop positions compared
    unchecked_hops: int = 0  # hops found with no auditor (nobody else serves the blocks)
    countdown: int = field(init=False)  # tokens to the next check, this one included

    def __post_init__(self) -> None:
        seed = self.policy.seed
        self.rng = random.Random(seed) if seed is not None else random.SystemRandom()
        self.countdown = self._draw() if self.policy.fraction > 0 else 1 << 62

    def due(self) -> bool:
        """Whether the token just picked gets a check (each does with chance ``fraction``)."""
        self.countdown -= 1
        if self.countdown > 0:
            return False
        self.countdown = self._draw()
        return True

    def _draw(self) -> int:
        """Tokens until the next check: geometric, as if each token were drawn alone."""
        f = self.policy.fraction
        if f >= 1.0:
            return 1
        return 1 + int(math.log(1.0 - self.rng.random()) / math.log(1.0 - f))

    async def close(self) -> None:
        auditors, self.auditors = list(self.auditors.values()), {}
        async with trio.open_nursery() as nursery:
            for auditor in auditors:
                nursery.start_soon(auditor.conn.close)

    async def reset(self) -> None:
        """Start every check afresh (after a rollback): an auditor's stream may still hold
        outputs of steps sent ahead, for positions about to be redone."""
        auditors, self.auditors = list(self.auditors.values()), {}
        for auditor in auditors:
            await auditor.conn.abort()

    async def _outputs(
        self, auditor: Auditor, source: History, cuts: Sequence[tuple[int, int]], top_k: int
    ) -> AsyncGenerator[tuple[int, int, npt.NDArray[Any]], None]:
        """The auditor's output for each ``(start, end)`` of ``cuts`` in order, up to
        ``WINDOW`` steps sent ahead as pushes into its own session (no round trip each;
        one at a time where its server gave no push key)."""
        conn = auditor.conn
        if not conn.key:
            for a, b in cuts:
                yield a, b, await conn.step(source.read(a, b)[None], a, top_k=top_k)
            return
        sent = 0
        for i, (a, b) in enumerate(cuts):
            while sent < min(len(cuts), i + WINDOW):
                c, d = cuts[sent]
                await conn.push(source.read(c, d)[None], c, (), 0, top_k=top_k)
                sent += 1
            y = await conn.pushed(top_k, start=a, positions=b - a, timed=False)
            if y is None:  # only with a grace time, which is not given here
                raise PeerTimeout(f"auditor {conn.peer} sent nothing for {a}-{b}")
            yield a, b, y

    async def check(
        self,
        hops: Sequence[HopState],
        boundaries: Sequence[History],
        upto: int,
        *,
        token: int | None,
        sampler: Sampler | None,
        sampled_from: int,
        banned: set[str],
    ) -> Mismatch | None:
        """Recompute every hop's outputs for positions before ``upto`` not checked yet; the
        earliest mismatch (lowest position, then lowest hop), if any. ``token`` is the one
        picked at ``upto``, not yet fed; positions from ``sampled_from`` hold picked
        tokens, checked against the last hop's auditor's logits."""
        self.checks += 1
        await self._retire(hops)
        found: list[Mismatch] = []
        route = {h.conn.peer for h in hops}

        async def one(k: int) -> None:
            auditor = await self._auditor(hops[k], route | banned)
            if auditor is None:
                return
            last = k == len(hops) - 1
            try:
                if last:
                    m = await self._check_last(k, hops[k], auditor, boundaries, upto, token,
                                               sampler, sampled_from)  # fmt: skip
                else:
                    m = await self._check_hidden(k, hops[k], auditor, boundaries, upto)
            except HOP_ERRORS as exc:  # the auditor failed, not the hop: find another
                log.warning("auditor %s of hop %s failed: %s", auditor.conn.peer, k, exc)
                self.unusable.add(auditor.conn.peer)
                self.auditors.pop(hops[k].conn, None)
                await auditor.conn.abort()
                return
            if m is not None:
                found.append(m)

        async with trio.open_nursery() as nursery:
            for k in range(len(hops)):
                nursery.start_soon(one, k)
        while found:
            mismatch = min(found, key=lambda m: (m.position, m.hop))
            found.remove(mismatch)
            if await self._upheld(mismatch, hops, route | banned, sampler):
                self.evidence.append(mismatch.evidence)
                return mismatch
        return None

    async def _upheld(
        self, m: Mismatch, hops: Sequence[HopState], avoid: set[str], sampler: Sampler | None
    ) -> bool:
        """Whether a referee (a third server for the blocks, recomputing the disputed
        position from the evidence's inputs) rejects the server's output too; True when
        there is none. An auditor it overrules is dropped, and its hop checked afresh."""
        e, last = m.evidence, m.hop == len(hops) - 1
        atol, rtol = self._tolerance()
        for peer in await self._candidates(e.layers, avoid | {e.auditor}):
            try:
                conn = await self._open(peer, e.layers)
            except HOP_ERRORS:
                continue
            try:
                y = await self._recompute(conn, e.inputs, self._top_k(sampler) if last else 0)
            except HOP_ERRORS as exc:
                log.info("referee %s failed: %s", peer, exc)
                self.unusable.add(peer)
                continue
            finally:
                await conn.close()
            if last and sampler is not None:
                pick = sampler(e.recomputed[None], e.position + 1)
                with_server = token_agrees(int(e.served[0]), y, sampler, e.position + 1, atol, rtol)
                with_auditor = token_agrees(pick, y, sampler, e.position + 1, atol, rtol)
            else:
                with_server = first_mismatch(e.served[None], y[None], atol, rtol) is None
                with_auditor = first_mismatch(e.recomputed[None], y[None], atol, rtol) is None
            if with_server:  # the server stays; the auditor goes, and its hop is checked afresh
                log.warning("referee %s sides with %s against auditor %s", peer, e.peer, e.auditor)
                self.refuted += not with_auditor
                if not with_auditor:
                    self.unusable.add(e.auditor)
                auditor = self.auditors.pop(hops[m.hop].conn, None)
                if auditor is not None:
                    await auditor.conn.abort()
                return False
            return True
        return True

    async def _recompute(
        self, conn: ShardConnection, inputs: npt.NDArray[Any], top_k: int
    ) -> npt.NDArray[Any]:
        """The output for the last of ``inputs``' positions, fed from position 0 (the last
        position alone, so that a last shard's logits are for it)."""
        n, y = inputs.shape[0], None
        cuts = [*range(0, n - 1, self.config.chunk), n - 1, n]
        for a, b in itertools.pairwise(sorted(set(cuts))):
            y = await conn.step(inputs[a:b][None], a, top_k=top_k if b == n else 0)
        assert y is not None
        return np.asarray(y[0] if y.ndim == 2 else y[0, -1])

    async def _retire(self, hops: Sequence[HopState]) -> None:
        """Close the auditors of hops no longer on the route (replaced since)."""
        live = {h.conn for h in hops}
        self.alone &= live
        for key in [key for key in self.auditors if key not in live]:
            await self.auditors.pop(key).conn.close()

    async def _auditor(self, hop: HopState, avoid: set[str]) -> Auditor | None:
        auditor = self.auditors.get(hop.conn)
        if auditor is not None or hop.conn in self.alone:
            return auditor
        layers = hop.conn.layers
        for peer in await self._candidates(layers, avoid):
            try:
                conn = await self._open(peer, layers)
            except HOP_ERRORS:
                continue
            auditor = self.auditors[hop.conn] = Auditor(conn)
            return auditor
        self.unchecked_hops += 1
        self.alone.add(hop.conn)
        log.warning("no auditor for blocks %s: nobody else serves them", layers)
        return None

    async def _candidates(self, layers: LayerRange, avoid: set[str]) -> list[str]:
        """Other servers of exactly ``layers``, in an order the servers cannot predict."""
        options = await self.find_options()
        peers = sorted({o.peer_id for o in options if o.layers == layers} - avoid - self.unusable)
        self.rng.shuffle(peers)
        return peers

    async def _open(self, peer: str, layers: LayerRange) -> ShardConnection:
        try:
            return await ShardConnection.open(
                self.opener,
                peer,
                self.model,
                layers,
                self.config.max_length,
                timeout=self.config.step_timeout,
                dtype=self.config.dtype,
            )
        except HOP_ERRORS as exc:
            log.info("no checking session on %s for blocks %s: %s", peer, layers, exc)
            self.unusable.add(peer)
            raise

    @staticmethod
    def _top_k(sampler: Sampler | None) -> int:
        """Logits a last hop's checker asks for: greedy the top two (to tell a near tie
        from a wrong token), top-k sampling its k, other sampling all of them."""
        if sampler is not None and sampler.spec.greedy:
            return 2
        return sampler.spec.top_k if sampler is not None else 0

    def _tolerance(self) -> tuple[float, float]:
        return self.policy.atol, self.policy.tolerance(self.config.dtype)

    async def _check_hidden(
        self, k: int, hop: HopState, auditor: Auditor, boundaries: Sequence[History], upto: int
    ) -> Mismatch | None:
        source, served = boundaries[k], boundaries[k + 1]
        atol, rtol = self._tolerance()
        size = self.config.chunk
        cuts = [(a, min(upto, a + size)) for a in range(auditor.done, upto, size)]
        async with aclosing(self._outputs(auditor, source, cuts, 0)) as outputs:
            async for a, b, y in outputs:
                if y.ndim != 3 or y.shape[:2] != (1, b - a):
                    raise ShardFailed(f"auditor sent {list(y.shape)} for {b - a} positions")
                mine = served.read(a, b)
                self.compared += b - a
                bad = first_mismatch(mine, y[0], atol, rtol)
                if bad is not None:
                    p, detail = a + bad, f"hidden states differ at position {a + bad}"
                    return self._mismatch(k, hop, auditor, source, p, mine[bad], y[0, bad], detail)
                auditor.done = b
        return None

    async def _check_last(
        self,
        k: int,
        hop: HopState,
        auditor: Auditor,
        boundaries: Sequence[History],
        upto: int,
        token: int | None,
        sampler: Sampler | None,
        sampled_from: int,
    ) -> Mismatch | None:
        """Feed the last hop's inputs to ``upto``, a picked token's position alone so its
        logits come back, and check each picked token against them."""
        source, tokens = boundaries[k], boundaries[0]
        atol, rtol = self._tolerance()

        def picked(q: int) -> int | None:  # the token the chain picked at position q
            if sampler is None or q < sampled_from or q > upto:
                return None
            if q == upto:
                return token
            return int(tokens.read(q, q + 1)[0])

        cuts, a = [], auditor.done
        while a < upto:
            b = a + 1
            while b < min(upto, a + self.config.chunk) and picked(b) is None:
                b += 1
            cuts.append((a, b))
            a = b
        async with aclosing(self._outputs(auditor, source, cuts, self._top_k(sampler))) as outs:
            async for _, b, logits in outs:
                want = picked(b)
                if want is not None and sampler is not None:
                    self.compared += 1
                    if not token_agrees(want, logits, sampler, b, atol, rtol):
                        detail = f"token {want} at {b} is not what the logits of {b - 1} give"
                        served = np.array([want], dtype=np.int64)
                        return self._mismatch(
                            k, hop, auditor, source, b - 1, served, logits[0], detail
                        )
                auditor.done = b
        return None

    def _attested(self, hop: HopState, source: History, position: int) -> Attested | None:
        """The hop's signed output covering ``position`` with the inputs it binds."""
        machine = hop.conn.machine
        entry = machine.signed_at(position)
        if entry is None:
            return None
        reply = entry.reply
        return Attested(
            model=machine.model,
            layers=machine.layers,
            session=machine.session,
            start=entry.start,
            end=entry.end,
            inputs=source.read(0, entry.end).copy(),
            y=reply.y,
            ids=reply.ids,
            vocab=reply.vocab,
            token=reply.token,
            chain=reply.chain,
            signature=reply.sig,
        )

    def _mismatch(
        self,
        k: int,
        hop: HopState,
        auditor: Auditor,
        source: History,
        position: int,
        served: npt.NDArray[Any],
        recomputed: npt.NDArray[Any],
        detail: str,
    ) -> Mismatch:
        evidence = Evidence(
            peer=hop.conn.peer,
            auditor=auditor.conn.peer,
            model=self.model,
            layers=hop.conn.layers,
            position=position,
            inputs=source.read(0, position + 1).copy(),
            served=np.array(served, copy=True),
            recomputed=np.array(recomputed, copy=True),
            detail=detail,
            found_at=trio.current_time(),
            attested=self._attested(hop, source, position),
        )
        log.warning("hop %s (%s, blocks %s): %s", k, hop.conn.peer, hop.conn.layers, detail)
        return Mismatch(k, position, evidence)
