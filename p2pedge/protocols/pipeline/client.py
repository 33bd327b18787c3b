"""Sharded generation over a chain of shard servers, pipelined, surviving server loss.

The client sits between hops (as in Petals): hop ``k`` reads boundary ``k`` (token ids
for ``k == 0``, else the hidden states hop ``k - 1`` produced) and writes boundary
``k + 1``. Every boundary keeps its whole history, and each hop counts the positions
it has consumed, so one routine does prefill, decode and recovery alike: drive every
hop until it has consumed all positions. Hops run as concurrent tasks, so a long
prompt split into chunks keeps several servers busy at once (pipelining).

With every hop in step, new positions go server to server instead when every server
issued a push key (``push.py``, ``pushing.py``): a decode step, or a prompt in chunks all
sent to hop 0 at once; the client collects each hop's output as it arrives, so the
boundaries' histories stay complete either way. Decoding
goes further (``codec.Ring``): the last server picks the token (greedy, or sampled by the
spec it is sent) and pushes it to the first, so the client only listens, and each token
costs one hop less. Each ring has an epoch; once the client gives up on a ring (a failure,
or an output that does not come), the steps it sends carry the next epoch and servers
refuse pushes from the old one.

When a hop fails (stream end, our own step deadline, an error reply) the client bans
the peer with back-off, picks a replacement chain for that hop's blocks, and sets the
new hops' counters to zero: driving again replays the stored history into them and
rebuilds their KV caches, while the hops downstream keep theirs.

With ``ClientConfig.verify`` the client also checks what the servers compute, on replicas
(``verify.py``), and hands out tokens only once checked; a hop caught computing wrong is
banned and replaced, and generation goes on from the position it got wrong
(``checked.py``). Every hop's hidden states must be finite, so NaN is blamed where it
first shows.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from contextlib import aclosing
from typing import Any

import numpy as np
import numpy.typing as npt
import trio

from p2pedge.errors import RemoteProtocolError, ShardFailed
from p2pedge.ids import LayerRange
from p2pedge.planning.routes import Hop, NoRoute, ServerOption, choose_route
from p2pedge.protocols.pipeline import codec
from p2pedge.protocols.pipeline.chain import (
    HOP_ERRORS,
    ClientConfig,
    History,
    HopFailed,
    HopState,
    check_output,
    hop_stats,
    leaves,
    open_chain,
    slow_hop,
    successor,
)
from p2pedge.protocols.pipeline.checked import CheckedChain
from p2pedge.protocols.pipeline.connection import StreamOpener
from p2pedge.protocols.pipeline.pushing import PushedChain
from p2pedge.protocols.pipeline.sampling import Sampler, greedy
from p2pedge.protocols.pipeline.verify import Audits

__all__ = ["HOP_ERRORS", "ClientConfig", "ShardedSession"]

log = logging.getLogger(__name__)

OptionsFinder = Callable[[], Awaitable[list[ServerOption]]]
# told, as a session ends, each hop's mean decode-step time (peer, blocks, seconds)
StepObserver = Callable[[str, LayerRange, float], None]
RING_TOP_K = 1  # a ring's last server names its token; the client needs only the top-1


class ShardedSession(PushedChain, CheckedChain):
    """Generation state for one sequence across a chain of shard servers."""

    def __init__(
        self,
        opener: StreamOpener,
        find_options: OptionsFinder,
        model: str,
        n_layers: int,
        config: ClientConfig | None = None,
        *,
        bans: dict[str, tuple[float, int]] | None = None,
        observe: StepObserver | None = None,
    ) -> None:
        """``bans`` may be shared between sessions (a node's), so a dead peer found by one
        session is skipped by the next instead of being re-learned; ``observe`` hears each
        hop's decode-step time when the session ends, for later route choice."""
        self.opener = opener
        self.find_options = find_options
        self.model = model
        self.n_layers = n_layers
        self.config = config or ClientConfig()
        self.hops: list[HopState] = []
        self.boundaries: list[History] = []
        self.last_logits: npt.NDArray[np.float32] | None = None
        self.recoveries = 0
        self._bans: dict[str, tuple[float, int]] = {} if bans is None else bans
        self._observe = observe
        self._progress = trio.Event()
        self.push_ok = self.config.push  # off for good once a pushed output fails to come
        self.pushed_steps = 0
        self.pushed_chunks = 0
        self.ring_ok = self.config.ring and self.config.push  # off until a hop is replaced
        self.ring_steps = 0  # tokens that came round a ring
        self.epoch = 0  # rings so far; see the module docstring
        self.reroutes = 0  # hops left mid-session because they turned slow
        policy = self.config.verify
        self.audits: Audits | None = None  # spot checks of the servers' work (`verify.py`)
        if policy is not None and policy.fraction > 0:
            self.audits = Audits(policy, opener, find_options, model, self.config)
        self.detections = 0  # hops caught computing wrong, banned and replaced
        self._distrusted: set[str] = set()  # caught: off this session's routes for good

    # --- set-up and tear-down --------------------------------------------------------

    async def __aenter__(self) -> ShardedSession:
        """Start unless already started (``open_sharded_session`` returns a started one;
        starting twice would open a second chain and strand the first one's sessions)."""
        if not self.hops:
            await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    @property
    def route(self) -> list[Hop]:
        return [Hop(h.conn.peer, h.conn.layers) for h in self.hops]

    def banned(self) -> set[str]:
        now = trio.current_time()
        banned = {peer for peer, (until, _) in self._bans.items() if until > now}
        return banned | self._distrusted

    def ban(self, peer: str) -> None:
        _, strikes = self._bans.get(peer, (0.0, 0))
        seconds = min(self.config.ban_seconds * 2**strikes, self.config.max_ban_seconds)
        self._bans[peer] = (trio.current_time() + seconds, strikes + 1)

    async def start(self, route: Sequence[Hop] | None = None) -> None:
        self.boundaries = [History(self.config.max_length)]
        first = True
        while True:
            plan = list(route) if route is not None and first else await self._plan(0, None)
            first = False
            try:
                self.hops = await self._open_chain(plan, plan[0].peer_id if self.ring_ok else "")
                break
            except HopFailed as failure:
                await self._note_failure(failure)
        self.boundaries += [History(self.config.max_length) for _ in self.hops]

    async def aclose(self) -> None:
        if self._observe is not None:
            for hop in self.hops:
                if hop.conn.decode_steps:
                    mean = hop.conn.decode_seconds / hop.conn.decode_steps
                    self._observe(hop.conn.peer, hop.conn.layers, mean)
        async with trio.open_nursery() as nursery:
            for hop in self.hops:
                nursery.start_soon(hop.conn.close)
            if self.audits is not None:
                nursery.start_soon(self.audits.close)
        self.hops = []

    async def _plan(self, start: int, end: int | None, avoid: str | None = None) -> list[Hop]:
        options = await self.find_options()
        banned = self.banned() if avoid is None else self.banned() | {avoid}
        return choose_route(
            options,
            self.n_layers if end is None else end,
            start=start,
            cost=self.config.cost,
            banned=banned,
        )

    async def _open_chain(self, plan: Sequence[Hop], successor: str) -> list[HopState]:
        try:
            return await open_chain(self.opener, self.model, plan, self.config, successor)
        except HopFailed as first:
            for other in first.others:  # every peer that failed is banned, not only the first
                log.warning("pipeline %s", other)
                self.ban(other.peer)
            raise

    async def _note_failure(self, failure: HopFailed) -> None:
        self.recoveries += 1
        log.warning("pipeline %s", failure)
        self.ban(failure.peer)
        if self.recoveries > self.config.max_recoveries:
            raise ShardFailed(f"gave up after {self.recoveries - 1} recoveries") from failure.cause

    # --- driving ---------------------------------------------------------------------

    async def extend(self, tokens: Sequence[int]) -> npt.NDArray[np.float32]:
        """Feed ``tokens`` after everything so far; the logits of the last one."""
        ids = np.asarray(tokens, dtype=np.int64)
        target = self.boundaries[0].length + ids.size
        if ids.size == 0 or target > self.config.max_length:
            raise ValueError(f"{target} positions do not fit max_length {self.config.max_length}")
        self.boundaries[0].write(self.boundaries[0].length, ids)
        return await self._settle(target)

    async def _settle(self, target: int) -> npt.NDArray[np.float32]:
        """Drive every hop through position ``target``, recovering from failed hops."""
        while True:
            failure: HopFailed | None = None
            try:
                await self._drive(target)
            except* HopFailed as group:
                failure = min(leaves(group), key=lambda f: f.index)
            if failure is None:
                assert self.last_logits is not None
                return self.last_logits
            await self._note_failure(failure)
            await self._replace(failure.index)

    async def _drive(self, target: int) -> None:
        if self._can_push(target):
            await self._push_steps(target)  # relaying below finishes whatever it did not
            if all(h.done == target for h in self.hops):
                return  # every hop is done: no idle hop workers to start
        async with trio.open_nursery() as nursery:
            for k in range(len(self.hops)):
                nursery.start_soon(self._hop_worker, k, target)

    async def _hop_worker(self, k: int, target: int) -> None:
        hop, source = self.hops[k], self.boundaries[k]
        last = k == len(self.hops) - 1
        while hop.done < target:
            while source.length <= hop.done:
                await self._progress.wait()
            end = min(source.length, hop.done + self.config.chunk)
            x = source.read(hop.done, end)[None]
            try:
                top_k = self.config.logits_top_k if last else 0
                y = await hop.conn.step(x, hop.done, top_k=top_k, epoch=self.epoch)
            except HOP_ERRORS as exc:
                raise HopFailed(k, hop.conn.peer, exc) from exc
            self._accept(k, y, hop.done, end, target)

    def _can_ring(self) -> bool:
        at = self.boundaries[0].length
        return (
            self.ring_ok
            and not self.detections  # stale ring outputs could pass for redone positions
            and all(h.done == at for h in self.hops)
            and self._chain_pushes(ring=True)
        )

    async def _ring(
        self, token: int, n: int, eos_id: int | None, sampler: Sampler
    ) -> AsyncGenerator[int, None]:
        """Feed ``token`` and let the chain produce up to ``n`` tokens by itself (the last
        server picks each as ``sampler`` would), each yielded once every hop's output for
        it is stored. Ends early, leaving the rest to relayed steps, when a hop fails (it
        is replaced) or an output is late."""
        start = self.boundaries[0].length
        self.boundaries[0].write(start, np.array([token], dtype=np.int64))
        # a quiet ring leaves no hidden states to check: checked sessions ring aloud
        chain, quiet = self._forwards(RING_TOP_K), self.config.ring_quiet and not self.audits
        eos = codec.NO_EOS if eos_id is None else eos_id
        ring = codec.Ring(chain, n, eos, quiet, sampler.spec)
        try:
            for i in range(n):
                at = start + i
                try:
                    if i == 0:
                        await self._first_step(at, at + 1, chain[1:], ring)
                    if quiet:
                        arrived = await self._quiet_token(at)
                    else:  # every hop's output, the first hop's already in for i == 0
                        first = 1 if i == 0 else 0
                        arrived = await self._collect_outputs(at, at + 1, first, RING_TOP_K)
                    if not arrived:
                        self.ring_ok = False
                        return
                    token = self._ring_token(sampler)
                except HopFailed as failure:
                    await self._note_failure(failure)
                    await self._replace(failure.index)
                    return
                self.ring_steps += 1
                if i < n - 1 and token != eos_id:
                    self.boundaries[0].write(at + 1, np.array([token], dtype=np.int64))
                yield token
                if token == eos_id or slow_hop(self.hops) is not None:
                    return  # a slowed hop: the client drives again once it has moved
        finally:
            self.epoch += 1  # whatever is still going round is stale from here on

    def _ring_token(self, sampler: Sampler) -> int:
        """The token the last server says it picked; for greedy, checked against its top-1."""
        last = self.hops[-1].conn
        token = last.last_token
        greedy_mismatch = (
            sampler.spec.greedy
            and self.last_logits is not None
            and token != int(np.argmax(self.last_logits))
        )
        if token is None or greedy_mismatch:
            problem = f"ring step answered with token {token}, not the greedy pick"
            raise HopFailed(len(self.hops) - 1, last.peer, RemoteProtocolError(problem))
        return token

    async def _quiet_token(self, at: int) -> bool:
        """The last hop's logits for the next position of a quiet ring (kept as
        ``last_logits``; no history is stored, so hops past the first stay where the ring
        began and driving again replays the ring's positions); False if they are late."""
        k = len(self.hops) - 1
        last, grace = self.hops[k], self._grace(self.hops)
        try:
            y = await last.conn.pushed(RING_TOP_K, start=at, within=grace, timed=False)
        except HOP_ERRORS as exc:
            raise HopFailed(k, last.conn.peer, exc) from exc
        if y is None:
            log.info("no token round the quiet ring in %.3g s", grace)
            return False
        problem = check_output(y, 1, True)
        if problem:
            raise HopFailed(k, last.conn.peer, RemoteProtocolError(problem))
        self.last_logits = y[0]
        return True

    async def _replace(self, index: int, avoid: str | None = None) -> bool:
        """Swap hop ``index`` for a fresh chain over its blocks (or up to a later boundary).

        For a failed hop (``avoid`` None) the old stream is dropped first and no server
        left raises :class:`ShardFailed`. Moving off a slow but working hop avoids its peer
        and keeps the hop, returning False, when nobody else serves those blocks."""
        old = self.hops[index]
        if avoid is None:
            await old.conn.abort()
        start = old.conn.layers.start
        ends = [h.conn.layers.end for h in self.hops[index:]]
        while True:
            plan: list[Hop] | None = None
            for j, end in enumerate(ends):
                try:
                    plan = await self._plan(start, end, avoid)
                except NoRoute:
                    continue
                last_replaced = index + j
                break
            if plan is None:
                if avoid is not None:
                    return False
                raise ShardFailed(f"no server left for blocks {start}-{ends[-1]}")
            nxt = successor(self.hops, index, last_replaced, plan, ring=self.config.ring)
            try:
                new = await self._open_chain(plan, nxt)
                break
            except HopFailed as failure:
                await self._note_failure(failure)
        if avoid is not None:
            await old.conn.abort()  # not waiting on a slow server to say goodbye
        for gone in self.hops[index + 1 : last_replaced + 1]:
            await gone.conn.close()
        inner = [History(self.config.max_length) for _ in new[:-1]]
        self.hops[index : last_replaced + 1] = new
        self.boundaries[index + 1 : last_replaced + 1] = inner
        self.ring_ok = self.config.ring and self.config.push  # a new chain: try again
        log.info("pipeline replaced hop %s with %s", index, [str(h.layers) for h in plan])
        return True

    async def _move_off_slow_hops(self) -> None:
        """Replace each slowed hop by another server for its blocks (the history replays
        into it); a hop nobody else serves stays, and is not judged again this session."""
        while (k := slow_hop(self.hops)) is not None:
            conn, window = self.hops[k].conn, self.hops[k].conn.window
            log.info("pipeline hop %s (%s, blocks %s) %s", k, conn.peer, conn.layers, window)
            if not await self._replace(k, avoid=conn.peer):
                conn.window = None
                continue
            self.reroutes += 1
            if self._observe is not None and window is not None and window.recent_s:
                self._observe(conn.peer, conn.layers, window.recent_s)  # for later routes

    # --- generation ------------------------------------------------------------------

    async def generate(
        self,
        prompt: Sequence[int],
        max_new_tokens: int,
        *,
        eos_id: int | None = None,
        sampler: Sampler = greedy,
    ) -> list[int]:
        """Prefill ``prompt`` (pipelined in chunks), then decode token by token."""
        tokens = self.stream(prompt, max_new_tokens, eos_id=eos_id, sampler=sampler)
        async with aclosing(tokens):
            return [token async for token in tokens]

    async def stream(
        self,
        prompt: Sequence[int],
        max_new_tokens: int,
        *,
        eos_id: int | None = None,
        sampler: Sampler = greedy,
    ) -> AsyncGenerator[int, None]:
        """:meth:`generate`, one token at a time (round a ring when the chain allows; the
        sampler is called with each token's position). Leaving early leaves a ring running
        until the session closes. With checks on (``ClientConfig.verify``) a token comes
        out only once a check has covered it, so tokens come in bursts, and each is the
        token an honest chain gives."""
        logits = await self.extend(prompt)
        if self.audits is None:
            tokens = self._tokens(logits, max_new_tokens, eos_id, sampler)
        else:
            tokens = self._checked(logits, max_new_tokens, eos_id, sampler)
        async with aclosing(tokens):
            async for token in tokens:
                yield token

    async def _tokens(
        self, logits: npt.NDArray[np.float32], n: int, eos_id: int | None, sampler: Sampler
    ) -> AsyncGenerator[int, None]:
        """Up to ``n`` tokens, the first picked from ``logits`` (those of the last position
        fed); each new one is fed, relayed, pushed or round a ring, before the next."""
        token, produced = sampler(logits, self.boundaries[0].length), 1
        yield token
        while produced < n and token != eos_id:
            if self._can_ring():
                # a checked session's ring stops at the next check: servers do not run
                # ahead of it (a bad one would go on computing wrong, and be paid for it)
                span = n - produced
                if self.audits is not None:
                    span = min(span, self.audits.countdown)
                ring = self._ring(token, span, eos_id, sampler)
                async with aclosing(ring):
                    async for token in ring:
                        produced += 1
                        span -= 1
                        yield token
                if produced >= n or token == eos_id:
                    return
                if not span:  # ran its course: its last token is not fed yet
                    await self._move_off_slow_hops()
                    continue
                # the ring broke off: its last token is fed but not yet through every hop
                await self._move_off_slow_hops()
                logits = await self._settle(self.boundaries[0].length)
            else:
                await self._move_off_slow_hops()
                logits = await self.extend([token])
            token, produced = sampler(logits, self.boundaries[0].length), produced + 1
            yield token

    def hop_stats(self) -> list[dict[str, Any]]:
        """Per hop: peer, blocks, steps and mean seconds per step (for reports)."""
        return hop_stats(self.hops)
