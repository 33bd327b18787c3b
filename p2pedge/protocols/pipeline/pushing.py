"""The client's side of server-to-server push: what a :class:`~client.ShardedSession`
stores of each hop's output, and driving steps through the chain by push.

Pushed steps (``push.py`` is the server's side) leave the client out of the path from one
server to the next: it sends a step to the first hop with the chain after it and collects
every hop's output as it arrives, so each boundary's history stays complete for recovery.
A decode step is one position. A prompt goes in chunks, all sent to the first hop at once
as pushed steps into the client's own session (no reply awaited), and every hop's outputs
are collected as they come: a server reads each stream in order and runs each step before
reading the next, so chunks wait in its stream while it computes one, and the servers work
on different chunks at once, as with relaying, but with no round trip through the client
between chunks or hops.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import trio

from p2pedge.errors import RemoteProtocolError
from p2pedge.protocols.pipeline import codec
from p2pedge.protocols.pipeline.chain import (
    HOP_ERRORS,
    ClientConfig,
    History,
    HopFailed,
    HopState,
    check_output,
)

log = logging.getLogger(__name__)

# How long to wait for a pushed output before relaying that step instead: a multiple of
# the hop's mean step time, never under the floor.
PUSH_GRACE_FACTOR = 4.0
PUSH_GRACE_MIN_S = 1.0


class PushedChain:
    """A chain's hops and boundaries, and the pushed way of driving them."""

    hops: list[HopState]
    boundaries: list[History]
    config: ClientConfig
    last_logits: npt.NDArray[np.float32] | None
    epoch: int
    push_ok: bool  # off for good once a pushed output fails to come
    pushed_steps: int  # decode steps pushed
    pushed_chunks: int  # prompt chunks pushed
    _progress: trio.Event
    _chunk_s: float = 0.0  # the longest a hop took per chunk in the prompt being pushed

    def _accept(self, k: int, y: npt.NDArray[Any], start: int, end: int, target: int) -> None:
        """Hop ``k``'s output for positions ``start .. end``, checked and stored (the last
        hop's logits are kept when they are for ``target``, the end of this extend)."""
        hop, last = self.hops[k], k == len(self.hops) - 1
        problem = check_output(y, end - start, last)
        if problem:
            raise HopFailed(k, hop.conn.peer, RemoteProtocolError(problem))
        if last:
            if end == target:
                self.last_logits = y[0]
            self.boundaries[k + 1].write(start, np.zeros(end - start, dtype=np.int8))
        else:
            self.boundaries[k + 1].write(start, y[0])
        hop.done = end
        self._progress.set()
        self._progress = trio.Event()

    def _chain_pushes(self, *, ring: bool = False) -> bool:
        hops = self.hops + self.hops[:1] if ring else self.hops
        return (
            len(self.hops) > 1
            and all(h.conn.key for h in self.hops)  # a server without a key does not push
            # a server holding two consecutive ranges would push to itself: relay instead
            and all(a.conn.peer != b.conn.peer for a, b in itertools.pairwise(hops))
        )

    def _can_push(self, target: int) -> bool:
        """Every hop is at the same position short of ``target`` and the chain pushes."""
        at = self.hops[0].done
        return (
            self.push_ok
            and at < target
            and all(h.done == at for h in self.hops)
            and self._chain_pushes()
        )

    def _forwards(self, last_top_k: int) -> tuple[codec.Forward, ...]:
        """Every hop as a push target; the last one sends ``last_top_k`` logits."""
        last = len(self.hops) - 1
        return tuple(
            codec.Forward(h.conn.peer, h.conn.session, h.conn.key, last_top_k if k == last else 0)
            for k, h in enumerate(self.hops)
        )

    @staticmethod
    def _grace(hops: Sequence[HopState]) -> float:
        """How long to wait for an output that needs ``hops``' steps before giving up on
        it: a multiple of their mean step times, never under the floor."""
        means = [h.conn.busy_seconds / h.conn.steps for h in hops if h.conn.steps]
        return max(PUSH_GRACE_MIN_S, PUSH_GRACE_FACTOR * sum(means))

    async def _pushed_output(
        self, k: int, start: int, end: int, grace: float, last_top_k: int
    ) -> npt.NDArray[Any] | None:
        """Hop ``k``'s pushed output for ``start .. end`` (None if late); a failed hop
        raises :class:`HopFailed`."""
        hop = self.hops[k]
        top_k = last_top_k if k == len(self.hops) - 1 else 0
        try:
            # a chunk's wait covers other servers' work too: only decode steps are timed
            n = end - start
            out = await hop.conn.pushed(top_k, start=start, positions=n, within=grace, timed=n == 1)
        except HOP_ERRORS as exc:
            raise HopFailed(k, hop.conn.peer, exc) from exc
        if out is None:
            log.info("no pushed output for %d-%d from hop %s in %.3g s", start, end, k, grace)
        return out

    async def _collect_outputs(self, start: int, end: int, first: int, last_top_k: int) -> bool:
        """Every pushed output for ``start .. end`` from hop ``first`` on (the last hop
        sends ``last_top_k`` logits), stored; False at the first that is late."""
        for k in range(first, len(self.hops)):
            out = await self._pushed_output(k, start, end, self._grace([self.hops[k]]), last_top_k)
            if out is None:
                return False
            self._accept(k, out, start, end, end)
        return True

    async def _first_step(
        self, start: int, end: int, fwd: tuple[codec.Forward, ...], ring: codec.Ring | None = None
    ) -> None:
        first = self.hops[0]
        x = self.boundaries[0].read(start, end)[None]
        try:
            y = await first.conn.step(x, start, fwd=fwd, ring=ring, epoch=self.epoch)
        except HOP_ERRORS as exc:
            raise HopFailed(0, first.conn.peer, exc) from exc
        self._accept(0, y, start, end, end)

    async def _push_steps(self, target: int) -> None:
        """Positions up to ``target`` through the chain, pushed server to server: one
        decode step, or a prompt in chunks (see the module docstring). A late output turns
        push off for the session; relaying then finishes whatever is not done."""
        start, top_k, size = self.hops[0].done, self.config.logits_top_k, self.config.chunk
        fwd = self._forwards(top_k)[1:]
        if target - start == 1:  # a decode step: no tasks (each costs on a cold hop path)
            await self._first_step(start, target, fwd)
            arrived = await self._collect_outputs(start, target, 1, top_k)
            self.pushed_steps += arrived
        else:
            chunks = [(a, min(a + size, target)) for a in range(start, target, size)]
            first = self.hops[0].conn
            for a, b in chunks:  # all at once: the first server runs them one by one
                try:
                    await first.push(self.boundaries[0].read(a, b)[None], a, fwd, self.epoch)
                except HOP_ERRORS as exc:
                    raise HopFailed(0, first.peer, exc) from exc
            self._chunk_s = 0.0
            async with trio.open_nursery() as nursery:
                for k in range(len(self.hops)):
                    nursery.start_soon(self._collect_chunks, k, chunks, target, nursery)
            arrived = all(h.done == target for h in self.hops)
            self.pushed_chunks += len(chunks) if arrived else 0
        if not arrived:
            self.push_ok = False  # relaying from now on

    async def _collect_chunks(
        self, k: int, chunks: list[tuple[int, int]], target: int, nursery: trio.Nursery
    ) -> None:
        """Hop ``k``'s output for each chunk, due within a multiple of the longest time
        any hop took per chunk so far once the hop before it has answered that chunk (or,
        for the first hop, once it answered the chunk before); a late one ends pushing."""
        for a, b in chunks:
            while k and self.hops[k - 1].done < b:
                await self._progress.wait()
            waited = trio.current_time()
            grace = max(PUSH_GRACE_MIN_S, PUSH_GRACE_FACTOR * self._chunk_s)
            out = await self._pushed_output(k, a, b, grace, self.config.logits_top_k)
            if out is None:
                nursery.cancel_scope.cancel()
                return
            self._chunk_s = max(self._chunk_s, trio.current_time() - waited)
            self._accept(k, out, a, b, target)
