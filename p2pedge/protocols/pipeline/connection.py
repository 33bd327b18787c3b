"""Client end of one pipeline session on one server: open, step, close, with deadlines.

A thin trio driver of :class:`~hop_machine.HopMachine`, which holds the session's
state and checks every reply. A request cancelled half-way leaves its reply on the
stream; the next request drains it first, and because every step names its start
position (the server rewinds to it) a resent step is harmless.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import numpy.typing as npt
import trio

from p2pedge.errors import (
    LocalProtocolError,
    PeerTimeout,
    PeerUnavailable,
    RemoteProtocolError,
    ShardFailed,
)
from p2pedge.ids import LayerRange
from p2pedge.planning.routes import Hop
from p2pedge.planning.slowdown import StepWindow
from p2pedge.protocols._stream import FramedStream
from p2pedge.protocols.pipeline import codec
from p2pedge.protocols.pipeline.chain import HOP_ERRORS, ClientConfig, HopFailed, HopState
from p2pedge.protocols.pipeline.client_machine import pushes_to
from p2pedge.protocols.pipeline.hop_machine import HopMachine, error_to_exception

__all__ = ["ShardConnection", "StreamOpener", "error_to_exception", "open_chain"]

StreamOpener = Callable[[str, str], Awaitable[FramedStream]]


class ShardConnection:
    """One open session on ``peer`` for blocks ``layers``; all calls take a deadline."""

    def __init__(self, peer: str, layers: LayerRange, stream: FramedStream, timeout: float) -> None:
        self.machine = HopMachine(peer, layers)
        self.stream = stream
        self.timeout = timeout

    # the machine's state, read where a connection is at hand
    @property
    def peer(self) -> str:
        return self.machine.peer

    @property
    def layers(self) -> LayerRange:
        return self.machine.layers

    @property
    def session(self) -> int:
        return self.machine.session

    @property
    def key(self) -> bytes:
        return self.machine.key

    @property
    def steps(self) -> int:
        return self.machine.steps

    @property
    def busy_seconds(self) -> float:
        return self.machine.busy_seconds

    @property
    def window(self) -> StepWindow | None:
        return self.machine.window

    @window.setter
    def window(self, window: StepWindow | None) -> None:
        self.machine.window = window

    @classmethod
    async def open(
        cls,
        opener: StreamOpener,
        peer: str,
        model: str,
        layers: LayerRange,
        max_length: int,
        *,
        timeout: float,
        dtype: str = "float32",
        pushes_to: str = "",
    ) -> ShardConnection:
        try:
            with trio.fail_after(timeout) if timeout else trio.CancelScope():
                stream = await opener(peer, codec.PROTOCOL_ID)
        except trio.TooSlowError as exc:
            raise PeerTimeout(
                f"opening a pipeline stream to {peer} took over {timeout:g} s"
            ) from exc
        conn = cls(peer, layers, stream, timeout)
        try:
            await conn._exchange(lambda: conn.machine.open(model, max_length, dtype, pushes_to))
        except BaseException:
            await conn.abort()
            raise
        return conn

    async def _exchange(self, make: Callable[[], codec.Request]) -> codec.Message:
        """Drain a given-up request's reply, send the request ``make`` gives, and return
        its (checked) reply; an error reply raises as typed."""
        try:
            with trio.fail_after(self.timeout):
                while self.machine.pending is not None:
                    msg = codec.from_map(await self.stream.receive())
                    self.machine.receive(msg, abandoned=True)
                await self.stream.send(codec.to_map(make()))
                while True:
                    reply = self.machine.receive(codec.from_map(await self.stream.receive()))
                    if reply is not None:
                        return reply
        except trio.TooSlowError as exc:
            raise PeerTimeout(f"{self.peer} did not answer within {self.timeout:.3g} s") from exc

    async def step(
        self,
        x: npt.NDArray[Any],
        start: int,
        *,
        top_k: int = 0,
        fwd: tuple[codec.Forward, ...] = (),
        ring: codec.Ring | None = None,
        epoch: int = 0,
    ) -> npt.NDArray[Any]:
        """The hop's output; with ``top_k`` on a last shard, full-width logits rebuilt from
        the top-k the server sent (a server that ignores ``top_k`` sends them all). With
        ``fwd`` the server also pushes its output on to those servers (``ring``: and on
        round the chain, see :class:`codec.Ring`)."""
        began = trio.current_time()
        reply = await self._exchange(
            lambda: self.machine.step(x, start, top_k=top_k, fwd=fwd, ring=ring, epoch=epoch)
        )
        took = trio.current_time() - began
        return self.machine.output(reply, top_k, took, int(x.shape[1]))

    async def push(
        self,
        x: npt.NDArray[Any],
        start: int,
        fwd: tuple[codec.Forward, ...],
        epoch: int,
        *,
        top_k: int = 0,
    ) -> None:
        """Send a step into our own session the way another server would push one (with
        the session's key, no reply awaited): its output comes as a pushed one (see
        :meth:`pushed`). The server reads its stream in order and runs each step before
        the next, so several such steps sent at once run one after another."""
        step = self.machine.push(x, start, fwd, epoch, top_k=top_k)
        try:
            with trio.fail_after(self.timeout):
                await self.stream.send(codec.to_map(step))
        except trio.TooSlowError as exc:
            raise PeerTimeout(f"{self.peer} took no step within {self.timeout:.3g} s") from exc

    async def pushed(
        self,
        top_k: int = 0,
        *,
        start: int,
        positions: int = 1,
        within: float | None = None,
        timed: bool = True,
    ) -> npt.NDArray[Any] | None:
        """The output of a step another server pushed into this session (``rid`` 0) for
        ``positions`` from ``start``, or None if it has not come ``within`` seconds (when
        that is shorter than the step timeout, which raises :class:`PeerTimeout` as usual).
        One deadline, not two nested: each cancel scope costs on a cold hop path.

        Replies to earlier requests still on the stream are skipped, and so are pushed
        outputs for other positions (of steps the client already gave up waiting for); an
        error about a pushed step raises like a failed request. ``timed=False`` leaves the
        hop's step times alone (the wait covered other servers' work too).
        """
        began = trio.current_time()
        grace = within is not None and within < self.timeout
        with trio.move_on_after(within if grace and within is not None else self.timeout):
            while True:
                msg = codec.from_map(await self.stream.receive())
                out = self.machine.receive_pushed(msg, start)
                if out is not None:
                    took = trio.current_time() - began if timed else None
                    return self.machine.output(out, top_k, took, positions)
        if grace:
            return None
        raise PeerTimeout(f"{self.peer} sent no pushed output within {self.timeout:.3g} s")

    async def close(self) -> None:
        """Close the session politely, then the stream; a dead peer is not an error here."""
        try:
            await self._exchange(self.machine.close)
        except (PeerUnavailable, ShardFailed, RemoteProtocolError, LocalProtocolError):
            pass  # the server frees the session when the stream ends anyway
        await self.abort()

    async def abort(self) -> None:
        with trio.CancelScope(shield=True), trio.move_on_after(1):
            try:
                await self.stream.close()
            except PeerUnavailable:
                pass  # nothing left to close


async def open_chain(
    opener: StreamOpener,
    model: str,
    plan: Sequence[Hop],
    config: ClientConfig,
    successor: str = "",
) -> list[HopState]:
    """A session on every hop of ``plan``, opened at once. If any fails, the rest are
    closed and the failure of the lowest hop is raised, the others in its ``others``.

    With push on, each server is told where it will push (the next hop; for the last,
    ``successor``: the hop after the chain, or round a ring the first), so it opens that
    stream while the prompt is relayed instead of at the first decode step."""
    conns: list[ShardConnection | None] = [None] * len(plan)
    failures: list[HopFailed] = []
    targets = pushes_to([h.peer_id for h in plan], successor, config.push)

    async def open_one(i: int, hop: Hop) -> None:
        try:
            conns[i] = await ShardConnection.open(
                opener,
                hop.peer_id,
                model,
                hop.layers,
                config.max_length,
                timeout=config.step_timeout,
                dtype=config.dtype,
                pushes_to=targets[i],
            )
        except HOP_ERRORS as exc:
            failures.append(HopFailed(i, hop.peer_id, exc))

    async with trio.open_nursery() as nursery:
        for i, hop in enumerate(plan):
            nursery.start_soon(open_one, i, hop)
    if failures:
        for conn in conns:
            if conn is not None:
                await conn.close()
        first = min(failures, key=lambda f: f.index)
        first.others = [f for f in failures if f is not first]
        raise first
    opened = [c for c in conns if c is not None]
    if config.slowdown is not None:
        for conn in opened:
            conn.window = StepWindow(config.slowdown)
    return [HopState(c) for c in opened]
