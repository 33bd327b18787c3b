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

What to do is decided by a sans-IO :class:`~client_machine.ClientMachine` (positions,
modes, epochs, bans, recovery); this module and ``pushing.py`` carry it out with trio.

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

from p2pedge.errors import ShardFailed
from p2pedge.ids import LayerRange
from p2pedge.planning.routes import Hop, NoRoute, ServerOption, choose_route
from p2pedge.protocols.pipeline.chain import (
    HOP_ERRORS,
    ClientConfig,
    History,
    HopFailed,
    HopState,
    hop_stats,
    leaves,
    slow_hop,
)
from p2pedge.protocols.pipeline.checked import CheckedChain
from p2pedge.protocols.pipeline.client_machine import RING_TOP_K, ClientMachine
from p2pedge.protocols.pipeline.connection import StreamOpener, open_chain
from p2pedge.protocols.pipeline.pushing import ChainDriver
from p2pedge.protocols.pipeline.sampling import Sampler, greedy
from p2pedge.protocols.pipeline.verify import Audits

__all__ = ["HOP_ERRORS", "ClientConfig", "ShardedSession"]

log = logging.getLogger(__name__)

OptionsFinder = Callable[[], Awaitable[list[ServerOption]]]
# told, as a session ends, each hop's mean decode-step time (peer, blocks, seconds)
StepObserver = Callable[[str, LayerRange, float], None]


class ShardedSession(ChainDriver, CheckedChain):
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
        super().__init__(ClientMachine(config or ClientConfig(), bans))
        self.opener = opener
        self.find_options = find_options
        self.model = model
        self.n_layers = n_layers
        self.config = self.m.config
        self._observe = observe
        self.reroutes = 0  # hops left mid-session because they turned slow
        policy = self.config.verify
        self.audits: Audits | None = None  # spot checks of the servers' work (`verify.py`)
        if policy is not None and policy.fraction > 0:
            self.audits = Audits(policy, opener, find_options, model, self.config)

    # --- the machine's state, read (and, by checked generation, set) as before ----------

    @property
    def hops(self) -> list[HopState]:  # type: ignore[override]
        return self.m.hops

    @property
    def boundaries(self) -> list[History]:  # type: ignore[override]
        return self.m.boundaries

    @property
    def last_logits(self) -> npt.NDArray[np.float32] | None:
        return self.m.last_logits

    @property
    def recoveries(self) -> int:
        return self.m.recoveries

    @property
    def epoch(self) -> int:
        return self.m.epoch

    @property
    def pushed_steps(self) -> int:
        return self.m.pushed_steps

    @property
    def pushed_chunks(self) -> int:
        return self.m.pushed_chunks

    @property
    def ring_steps(self) -> int:
        return self.m.ring_steps

    @property
    def push_ok(self) -> bool:
        return self.m.push_ok

    @push_ok.setter
    def push_ok(self, ok: bool) -> None:
        self.m.push_ok = ok

    @property
    def ring_ok(self) -> bool:
        return self.m.ring_ok

    @ring_ok.setter
    def ring_ok(self, ok: bool) -> None:
        self.m.ring_ok = ok

    @property
    def detections(self) -> int:
        return self.m.detections

    @detections.setter
    def detections(self, n: int) -> None:
        self.m.detections = n

    @property
    def _bans(self) -> dict[str, tuple[float, int]]:  # type: ignore[override]
        return self.m.bans

    @property
    def _distrusted(self) -> set[str]:  # type: ignore[override]
        return self.m.distrusted

    # --- set-up and tear-down --------------------------------------------------------

    async def __aenter__(self) -> ShardedSession:
        """Start unless already started (``open_sharded_session`` returns a started one;
        starting twice would open a second chain and strand the first one's sessions)."""
        if not self.m.hops:
            await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    @property
    def route(self) -> list[Hop]:
        return [Hop(h.conn.peer, h.conn.layers) for h in self.m.hops]

    def banned(self) -> set[str]:
        return self.m.banned(trio.current_time())

    def ban(self, peer: str) -> None:
        self.m.ban(peer, trio.current_time())

    async def start(self, route: Sequence[Hop] | None = None) -> None:
        first = True
        while True:
            plan = list(route) if route is not None and first else await self._plan(0, None)
            first = False
            try:
                hops = await self._open_chain(plan, plan[0].peer_id if self.m.ring_ok else "")
                break
            except HopFailed as failure:
                await self._note_failure(failure)
        self.m.started(hops)

    async def aclose(self) -> None:
        if self._observe is not None:
            for hop in self.m.hops:
                m = hop.conn.machine
                if m.decode_steps:
                    self._observe(m.peer, m.layers, m.decode_seconds / m.decode_steps)
        async with trio.open_nursery() as nursery:
            for hop in self.m.hops:
                nursery.start_soon(hop.conn.close)
            if self.audits is not None:
                nursery.start_soon(self.audits.close)
        self.m.hops = []

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
        log.warning("pipeline %s", failure)
        self.m.failed(failure, trio.current_time())

    # --- driving ---------------------------------------------------------------------

    async def extend(self, tokens: Sequence[int]) -> npt.NDArray[np.float32]:
        """Feed ``tokens`` after everything so far; the logits of the last one."""
        return await self._settle(self.m.feed(tokens))

    async def _settle(self, target: int) -> npt.NDArray[np.float32]:
        """Drive every hop through position ``target``, recovering from failed hops."""
        while True:
            failure: HopFailed | None = None
            try:
                await self._drive(target)
            except* HopFailed as group:
                failure = min(leaves(group), key=lambda f: f.index)
            if failure is None:
                assert self.m.last_logits is not None
                return self.m.last_logits
            await self._note_failure(failure)
            await self._replace(failure.index)

    async def _ring(
        self, token: int, n: int, eos_id: int | None, sampler: Sampler
    ) -> AsyncGenerator[int, None]:
        """Feed ``token`` and let the chain produce up to ``n`` tokens by itself (the last
        server picks each as ``sampler`` would), each yielded once every hop's output for
        it is stored. Ends early, leaving the rest to relayed steps, when a hop fails (it
        is replaced) or an output is late."""
        start = self.m.boundaries[0].length
        ring = self.m.ring_begin(token, n, eos_id, sampler.spec)
        late = False
        try:
            for i in range(n):
                at = start + i
                try:
                    if i == 0:
                        await self._first_step(at, at + 1, ring.chain[1:], ring)
                    # every hop's output, the first hop's already in for i == 0
                    first = 1 if i == 0 else 0
                    if not await self._collect_outputs(at, at + 1, first, RING_TOP_K):
                        late = True
                        return
                    token = self.m.ring_token(sampler.spec.greedy)
                except HopFailed as failure:
                    await self._note_failure(failure)
                    await self._replace(failure.index)
                    return
                if i < n - 1 and token != eos_id:
                    self.m.ring_feed(at + 1, token)
                yield token
                if token == eos_id or slow_hop(self.m.hops) is not None:
                    return  # a slowed hop: the client drives again once it has moved
        finally:
            self.m.ring_end(late=late)

    async def _replace(self, index: int, avoid: str | None = None) -> bool:
        """Swap hop ``index`` for a fresh chain over its blocks (or up to a later boundary).

        For a failed hop (``avoid`` None) the old stream is dropped first and no server
        left raises :class:`ShardFailed`. Moving off a slow but working hop avoids its peer
        and keeps the hop, returning False, when nobody else serves those blocks."""
        old = self.m.hops[index]
        if avoid is None:
            await old.conn.abort()
        start, ends = self.m.replaceable(index)
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
            nxt = self.m.successor(index, last_replaced, plan[0].peer_id)
            try:
                new = await self._open_chain(plan, nxt)
                break
            except HopFailed as failure:
                await self._note_failure(failure)
        if avoid is not None:
            await old.conn.abort()  # not waiting on a slow server to say goodbye
        for gone in self.m.replaced(index, last_replaced, new)[1:]:
            await gone.conn.close()
        log.info("pipeline replaced hop %s with %s", index, [str(h.layers) for h in plan])
        return True

    async def _move_off_slow_hops(self) -> None:
        """Replace each slowed hop by another server for its blocks (the history replays
        into it); a hop nobody else serves stays, and is not judged again this session."""
        while (k := slow_hop(self.m.hops)) is not None:
            conn, window = self.m.hops[k].conn, self.m.hops[k].conn.window
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
        token, produced = sampler(logits, self.m.boundaries[0].length), 1
        yield token
        while produced < n and token != eos_id:
            if self.m.can_ring():
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
                logits = await self._settle(self.m.boundaries[0].length)
            else:
                await self._move_off_slow_hops()
                logits = await self.extend([token])
            token, produced = sampler(logits, self.m.boundaries[0].length), produced + 1
            yield token

    def hop_stats(self) -> list[dict[str, Any]]:
        """Per hop: peer, blocks, steps and mean seconds per step (for reports)."""
        return hop_stats(self.hops)
