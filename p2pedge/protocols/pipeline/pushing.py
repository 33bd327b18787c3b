"""The trio side of a :class:`~client_machine.ClientMachine`: driving a chain's hops to a
position, relayed hop by hop or pushed server to server, as the machine decides.

Relaying runs one task per hop: hop ``k`` steps whatever new positions its input boundary
holds, so a long prompt split into chunks keeps several servers busy at once.

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

import logging
from typing import Any

import numpy.typing as npt
import trio

from p2pedge.protocols.pipeline import codec
from p2pedge.protocols.pipeline.chain import HOP_ERRORS, HopFailed
from p2pedge.protocols.pipeline.client_machine import ClientMachine

log = logging.getLogger(__name__)


class ChainDriver:
    """Carries out a :class:`ClientMachine`'s steps on its hops' connections."""

    def __init__(self, machine: ClientMachine) -> None:
        self.m = machine
        self._progress = trio.Event()  # set whenever a hop's output is stored
        self._chunk_s = 0.0  # the longest a hop took per chunk in the prompt being pushed

    def _accept(self, k: int, y: npt.NDArray[Any], start: int, end: int, target: int) -> None:
        self.m.accept(k, y, start, end, target)
        self._progress.set()
        self._progress = trio.Event()

    async def _drive(self, target: int) -> None:
        """Every hop through position ``target`` (pushed when the chain allows, relayed
        for whatever pushing did not finish); a failed hop raises :class:`HopFailed`."""
        if self.m.can_push(target):
            await self._push_steps(target)
            if self.m.settled(target):
                return  # every hop is done: no idle hop workers to start
        async with trio.open_nursery() as nursery:
            for k in range(len(self.m.hops)):
                nursery.start_soon(self._hop_worker, k, target)

    async def _hop_worker(self, k: int, target: int) -> None:
        conn = self.m.hops[k].conn
        while self.m.hops[k].done < target:
            span = self.m.relay_next(k, target)
            if span is None:
                await self._progress.wait()
                continue
            start, end = span
            try:
                y = await conn.step(
                    self.m.step_input(k, start, end),
                    start,
                    top_k=self.m.top_k(k),
                    epoch=self.m.epoch,
                )
            except HOP_ERRORS as exc:
                raise HopFailed(k, conn.peer, exc) from exc
            self._accept(k, y, start, end, target)

    async def _pushed_output(
        self, k: int, start: int, end: int, grace: float, last_top_k: int
    ) -> npt.NDArray[Any] | None:
        """Hop ``k``'s pushed output for ``start .. end`` (None if late); a failed hop
        raises :class:`HopFailed`."""
        conn = self.m.hops[k].conn
        top_k = last_top_k if k == len(self.m.hops) - 1 else 0
        try:
            # a chunk's wait covers other servers' work too: only decode steps are timed
            n = end - start
            out = await conn.pushed(top_k, start=start, positions=n, within=grace, timed=n == 1)
        except HOP_ERRORS as exc:
            raise HopFailed(k, conn.peer, exc) from exc
        if out is None:
            log.info("no pushed output for %d-%d from hop %s in %.3g s", start, end, k, grace)
        return out

    async def _collect_outputs(self, start: int, end: int, first: int, last_top_k: int) -> bool:
        """Every pushed output for ``start .. end`` from hop ``first`` on (the last hop
        sends ``last_top_k`` logits), stored; False at the first that is late."""
        for k in range(first, len(self.m.hops)):
            grace = self.m.grace([self.m.hops[k].conn.machine])
            out = await self._pushed_output(k, start, end, grace, last_top_k)
            if out is None:
                return False
            self._accept(k, out, start, end, end)
        return True

    async def _first_step(
        self, start: int, end: int, fwd: tuple[codec.Forward, ...], ring: codec.Ring | None = None
    ) -> None:
        conn = self.m.hops[0].conn
        x = self.m.step_input(0, start, end)
        try:
            y = await conn.step(x, start, fwd=fwd, ring=ring, epoch=self.m.epoch)
        except HOP_ERRORS as exc:
            raise HopFailed(0, conn.peer, exc) from exc
        self._accept(0, y, start, end, end)

    async def _push_steps(self, target: int) -> None:
        """Positions up to ``target`` through the chain, pushed server to server: one
        decode step, or a prompt in chunks (see the module docstring). A late output turns
        push off for the session; relaying then finishes whatever is not done."""
        start, top_k = self.m.hops[0].done, self.m.config.logits_top_k
        fwd = self.m.forwards(top_k)[1:]
        if target - start == 1:  # a decode step: no tasks (each costs on a cold hop path)
            await self._first_step(start, target, fwd)
            arrived = await self._collect_outputs(start, target, 1, top_k)
            self.m.pushed_steps += arrived
        else:
            chunks = self.m.chunks(target)
            first = self.m.hops[0].conn
            for a, b in chunks:  # all at once: the first server runs them one by one
                try:
                    await first.push(self.m.step_input(0, a, b), a, fwd, self.m.epoch)
                except HOP_ERRORS as exc:
                    raise HopFailed(0, first.peer, exc) from exc
            self._chunk_s = 0.0
            async with trio.open_nursery() as nursery:
                for k in range(len(self.m.hops)):
                    nursery.start_soon(self._collect_chunks, k, chunks, target, nursery)
            arrived = self.m.settled(target)
            self.m.pushed_chunks += len(chunks) if arrived else 0
        if not arrived:
            self.m.pushed_late()  # relaying from now on

    async def _collect_chunks(
        self, k: int, chunks: list[tuple[int, int]], target: int, nursery: trio.Nursery
    ) -> None:
        """Hop ``k``'s output for each chunk, due within a multiple of the longest time
        any hop took per chunk so far once the hop before it has answered that chunk (or,
        for the first hop, once it answered the chunk before); a late one ends pushing."""
        for a, b in chunks:
            while k and self.m.hops[k - 1].done < b:
                await self._progress.wait()
            waited = trio.current_time()
            grace = self.m.grace([], floor_s=self._chunk_s)
            out = await self._pushed_output(k, a, b, grace, self.m.config.logits_top_k)
            if out is None:
                nursery.cancel_scope.cancel()
                return
            self._chunk_s = max(self._chunk_s, trio.current_time() - waited)
            self._accept(k, out, a, b, target)
