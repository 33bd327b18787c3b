"""Server-to-server push: a server hands its step's output straight to the next server.

Client relaying costs every extra hop a second message and the client's handling of two
(about 1.2 ms of client CPU per hop here, in a one-off profile; on a real network, a
second link delay: ``simnet/push_latency.py``). With push, the client sends a step
to the first server with the chain after it (:class:`~codec.Forward` entries: peer,
session, that session's push key); each server pushes its output on as a step carrying
the next session's key, and still answers the session's owner (the client) with its
output, which the client keeps for recovery. A push that cannot be delivered is only
logged: the client notices the missing output and relays that step itself.

Clients name the peers a server dials, so every task a message starts here (warm-ups,
error readers, closes) runs under :func:`~p2pedge.protocols._stream.contain`: its failure
ends that push stream, never the node; warm-ups in flight and streams kept are bounded.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import numpy.typing as npt
import trio

from p2pedge.errors import PeerUnavailable, ProtocolError, RemoteProtocolError
from p2pedge.protocols._stream import FramedStream, QuickLock, contain
from p2pedge.protocols.pipeline import codec

log = logging.getLogger(__name__)

DEFAULT_PUSH_TIMEOUT = 2.0
MAX_PUSH_STREAMS = 64  # clients name the next servers; the oldest stream makes room
MAX_WARMING = 16  # push streams being opened ahead of their first push
PUSH_ERRORS = (PeerUnavailable, ProtocolError, trio.TooSlowError)
PushOpener = Callable[[str, str], Awaitable[FramedStream]]


class Pusher:
    """Pushed steps over one cached stream per next server; their error replies are
    read by a task in ``nursery`` and logged."""

    def __init__(
        self,
        opener: PushOpener,
        nursery: trio.Nursery,
        *,
        timeout: float = DEFAULT_PUSH_TIMEOUT,
        max_streams: int = MAX_PUSH_STREAMS,
        max_warming: int = MAX_WARMING,
    ) -> None:
        self.opener = opener
        self.nursery = nursery
        self.timeout = timeout
        self.max_streams = max_streams
        self.max_warming = max_warming
        self._warming: set[str] = set()
        self.warm_skipped = 0  # warm-ups not started: too many in flight
        self._streams: dict[str, FramedStream] = {}
        self._locks: dict[str, QuickLock] = {}
        self._sending: dict[str, float] = {}  # peer -> when its current send began
        self._watching = False
        self._rid = 0
        self.pushed = 0
        self.failed = 0
        self.warmed = 0  # streams opened ahead of their first push
        self._opened = trio.Event()  # set (and replaced) whenever a stream opens

    @property
    def peers(self) -> list[str]:
        """Next servers with an open push stream, oldest first."""
        return list(self._streams)

    async def push(
        self,
        fwd: tuple[codec.Forward, ...],
        start: int,
        y: npt.NDArray[Any],
        *,
        ring: codec.Ring | None = None,
        epoch: int = 0,
    ) -> bool:
        """Send ``y`` (positions from ``start``) to ``fwd[0]`` with the rest of the chain
        (and the ring and epoch the step came with).

        Only opening a stream runs under a deadline here: a cancel scope per push cost
        0.10-0.14 ms once a step had flushed the caches (a one-off hop trace). A send that
        blocks (the next server stopped reading) is ended by the watchdog instead.
        """
        target, rest = fwd[0], fwd[1:]
        async with self._lock(target.peer):
            try:
                stream = self._streams.get(target.peer) or await self._open(target.peer)
                self._rid = self._rid % codec.MAX_ID + 1
                step = codec.Step(
                    self._rid, target.session, start, y, target.top_k, rest, target.key, ring, epoch
                )
                self._sending[target.peer] = trio.current_time()
                try:
                    await stream.send(codec.to_map(step))
                finally:
                    del self._sending[target.peer]
                self.pushed += 1
                return True
            except PUSH_ERRORS as exc:
                log.info("push to %s failed: %r", target.peer, exc)
            self.failed += 1
            self._forget(target.peer)
            return False

    def warm(self, peer: str) -> None:
        """Open the stream to ``peer`` in the background (a session's client says where it
        will push), so that the first push does not wait for a dial and a handshake. A
        failure is only logged: the first push tries again. At most ``max_warming`` run
        at once (each is a dial to a peer a client named); past that the first push dials.
        """
        if peer in self._streams or peer in self._warming:
            return
        if len(self._warming) >= self.max_warming:
            self.warm_skipped += 1
            return
        self._warming.add(peer)
        self._spawn("push warm-up", peer, partial(self._warm, peer))

    def _spawn(self, what: str, peer: str, work: Callable[[], Awaitable[None]]) -> None:
        """Run ``work`` in the nursery, contained: its failure is logged, never raised."""

        async def contained() -> None:
            await contain(work(), what, peer)

        self.nursery.start_soon(contained)

    async def stream_to(self, peer: str) -> None:
        """Wait until a push stream to ``peer`` is open (for callers that must know)."""
        while peer not in self._streams:
            await self._opened.wait()

    def _lock(self, peer: str) -> QuickLock:
        """The lock that keeps one send (or open) at a time on the stream to ``peer``."""
        lock = self._locks.get(peer)
        if lock is None:
            lock = self._locks[peer] = QuickLock()
        return lock

    async def _warm(self, peer: str) -> None:
        try:
            async with self._lock(peer):
                if peer in self._streams:
                    return
                try:
                    await self._open(peer)
                    self.warmed += 1
                except PUSH_ERRORS as exc:
                    log.info("could not open a push stream to %s ahead of time: %r", peer, exc)
        finally:
            self._warming.discard(peer)

    async def _open(self, peer: str) -> FramedStream:
        if len(self._streams) >= self.max_streams:
            self._forget(next(iter(self._streams)))
        with trio.fail_after(self.timeout):
            stream = await self.opener(peer, codec.PROTOCOL_ID)
        self._streams[peer] = stream
        self._opened.set()
        self._opened = trio.Event()
        self._spawn("push stream reader", peer, partial(self._read_errors, peer, stream))
        if not self._watching:
            self._watching = True
            self._spawn("push watchdog", "", self._watchdog)
        return stream

    async def _watchdog(self) -> None:
        """While streams are open: forget (and so close) any whose send has been stuck for
        longer than the timeout, which wakes the blocked send with an error."""
        try:
            while self._streams:
                await trio.sleep(self.timeout / 2)
                now = trio.current_time()
                for peer, since in list(self._sending.items()):
                    if now - since > self.timeout:
                        log.info(
                            "push to %s stuck for %.3g s; dropping its stream", peer, now - since
                        )
                        self._forget(peer, reset=True)
        finally:
            self._watching = False

    async def _read_errors(self, peer: str, stream: FramedStream) -> None:
        try:
            while True:
                msg = codec.from_map(await stream.receive())
                if isinstance(msg, codec.Error):
                    log.info("%s refused a pushed step: %s: %s", peer, msg.code, msg.message)
        except (PeerUnavailable, RemoteProtocolError) as exc:
            log.debug("push stream to %s ended: %s", peer, exc)
        finally:
            if self._streams.get(peer) is stream:
                del self._streams[peer]
            await _close(stream)

    def _forget(self, peer: str, *, reset: bool = False) -> None:
        """Drop a stream that failed or hung; closing it ends its reader task too, and a
        reset (for a stuck send) also wakes a send blocked on it."""
        stream = self._streams.pop(peer, None)
        lock = self._locks.get(peer)
        if lock is not None and not lock.locked():
            del self._locks[peer]
        if stream is not None:
            self._spawn("push stream close", peer, partial(_close, stream, reset))


async def _close(stream: FramedStream, reset: bool = False) -> None:
    with trio.CancelScope(shield=True), trio.move_on_after(1):
        try:
            if reset:
                await stream.reset()
                return
            await stream.close()
        except PeerUnavailable:
            pass  # already gone
