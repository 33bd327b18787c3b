"""The single adapter between py-libp2p streams and our framed protocols.

py-libp2p's ``read_exactly`` gives up on multi-MiB messages, so we read what the muxer
hands us and let :class:`~p2pedge.wire.FrameDecoder` reassemble frames. Stream failures
become :class:`~p2pedge.errors.PeerUnavailable`; a silent peer becomes
:class:`~p2pedge.errors.PeerTimeout` after ``timeout`` seconds.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable
from typing import Any, Protocol

import trio

from p2pedge.errors import Busy, PeerTimeout, PeerUnavailable, ProtocolError
from p2pedge.wire.framing import DEFAULT_MAX_FRAME, FrameDecoder, encode_frame
from p2pedge.wire.messages import pack, unpack_map

READ_CHUNK = 1 << 20

log = logging.getLogger("p2pedge.protocols")


class ByteStream(Protocol):
    """What we need of a stream: py-libp2p's INetStream satisfies it, so do test pairs."""

    async def read(self, n: int | None = None) -> bytes: ...

    async def write(self, data: bytes) -> None: ...

    async def close(self) -> None: ...

    async def reset(self) -> None: ...


def _stream_errors() -> tuple[type[BaseException], ...]:
    from libp2p.network.stream.exceptions import StreamError

    return (StreamError, trio.BrokenResourceError, trio.ClosedResourceError, ConnectionError)


def libp2p_errors() -> tuple[type[BaseException], ...]:
    """What a raw py-libp2p stream's reads, writes and resets raise when the peer or the
    connection fails (every library error derives from ``BaseLibp2pError``)."""
    from libp2p.exceptions import BaseLibp2pError

    return (BaseLibp2pError, *_stream_errors())


def known_addrs(host: Any, peer: Any) -> list[Any]:
    """The addresses ``host``'s peerstore holds for ``peer`` (a py-libp2p ID); none when
    it knows none (py-libp2p raises for an unknown peer)."""
    from libp2p.peer.peerstore import PeerStoreError

    try:
        return list(host.get_peerstore().addrs(peer))
    except PeerStoreError:
        return []


async def reset_quietly(stream: ByteStream) -> None:
    """Reset a stream we are done with; shielded, since it runs on cancellation too, and
    bounded, since a reset is one frame and never a wait on the peer. A stream that is
    gone already is fine."""
    with trio.CancelScope(shield=True), trio.move_on_after(1):
        try:
            await stream.reset()
        except libp2p_errors() as exc:
            log.debug("reset of a finished stream failed: %r", exc)


class FramedStream:
    """Length-prefixed msgpack frames over a :class:`ByteStream`.

    ``source`` is the remote network address (host only) the stream came from, when known:
    servers charge quotas to it as well as to the peer id, since peer ids cost nothing.
    """

    def __init__(
        self, stream: ByteStream, *, max_frame: int = DEFAULT_MAX_FRAME, source: str = ""
    ) -> None:
        self.stream = stream
        self.max_frame = max_frame
        self.source = source
        self._decoder = FrameDecoder(max_frame)
        self._ready: list[bytes] = []
        self._errors = _stream_errors()

    def _encode(self, payload: bytes) -> bytes:
        return encode_frame(payload, self.max_frame)

    def _decode(self, chunk: bytes) -> list[bytes]:
        return self._decoder.feed(chunk)

    async def send_bytes(self, payload: bytes) -> None:
        try:
            await self.stream.write(self._encode(payload))
        except self._errors as exc:
            raise PeerUnavailable(f"stream write failed: {exc!r}") from exc

    async def send(self, message: dict[str, Any]) -> None:
        await self.send_bytes(pack(message))

    async def receive_bytes(self, timeout: float | None = None) -> bytes:
        """The next whole frame; ``PeerUnavailable`` on end of stream."""
        if timeout is None:
            return await self._receive_frame()
        with trio.move_on_after(timeout) as scope:
            return await self._receive_frame()
        assert scope.cancelled_caught
        raise PeerTimeout(f"no frame within {timeout:.3g} s")

    async def receive(self, timeout: float | None = None) -> dict[str, Any]:
        return unpack_map(await self.receive_bytes(timeout), self.max_frame)

    async def _receive_frame(self) -> bytes:
        while not self._ready:
            try:
                chunk = await self.stream.read(READ_CHUNK)
            except EOFError as exc:
                raise PeerUnavailable("peer closed the stream") from exc
            except self._errors as exc:
                raise PeerUnavailable(f"stream read failed: {exc!r}") from exc
            if not chunk:
                raise PeerUnavailable("peer closed the stream")
            self._ready.extend(self._decode(chunk))
        return self._ready.pop(0)

    def reframed(self, max_frame: int) -> FramedStream:
        """The same (not yet read) stream with another frame limit; keeps ``source``."""
        return FramedStream(self.stream, max_frame=max_frame, source=self.source)

    async def close(self) -> None:
        try:
            await self.stream.close()
        except self._errors:
            await self.reset()

    async def reset(self) -> None:
        try:
            await self.stream.reset()
        except self._errors as exc:
            raise PeerUnavailable(f"stream reset failed: {exc!r}") from exc


class QuickLock:
    """A ``trio.Lock`` whose uncontended acquire does not yield to the scheduler (trio's
    always does: one more trip through the event loop per message on the hop path)."""

    def __init__(self) -> None:
        self._lock = trio.Lock()

    async def __aenter__(self) -> None:
        try:
            self._lock.acquire_nowait()
        except trio.WouldBlock:
            await self._lock.acquire()

    async def __aexit__(self, *exc: object) -> None:
        self._lock.release()

    def locked(self) -> bool:
        return self._lock.locked()


class MemoryByteStream:
    """One end of an in-process stream pair (for sans-IO handler tests, not a fake peer)."""

    def __init__(
        self, send: trio.MemorySendChannel[bytes], receive: trio.MemoryReceiveChannel[bytes]
    ) -> None:
        self._send = send
        self._receive = receive

    async def read(self, n: int | None = None) -> bytes:
        try:
            return await self._receive.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            return b""

    async def write(self, data: bytes) -> None:
        await self._send.send(data)

    async def close(self) -> None:
        await self._send.aclose()

    async def reset(self) -> None:
        await self._send.aclose()
        await self._receive.aclose()


async def contain(work: Awaitable[None], what: str, peer: str) -> None:
    """Await ``work`` (a stream handler, or a task a peer's message started) so that no
    failure escapes into the nursery that runs it: a peer's message may end its stream or
    session, never the node. Each failure becomes one log line naming the peer; a failure
    of our own code (not a typed error) is logged with its traceback, since it is a bug.
    Cancellation and KeyboardInterrupt pass through. Errors arriving inside an
    ``ExceptionGroup`` (from a nursery in the handler) are matched member by member.
    """
    try:
        await work
    except* PeerUnavailable as group:
        log.debug("%s with %s ended: %s", what, peer, _first(group))
    except* Busy as group:
        log.info("%s with %s refused: %s", what, peer, _first(group))
    except* ProtocolError as group:
        log.warning("%s with %s broke the protocol: %s", what, peer, _first(group))
    except* Exception as group:
        log.error("%s with %s failed in our code", what, peer, exc_info=_first(group))


def _first(group: BaseExceptionGroup[BaseException]) -> BaseException:
    first: BaseException = group
    while isinstance(first, BaseExceptionGroup):
        first = first.exceptions[0]
    return first


def remote_host(stream: object) -> str:
    """The remote IP of a py-libp2p stream, or "" when the transport does not say."""
    get = getattr(stream, "get_remote_address", None)
    try:
        address = get() if get is not None else None
    except (OSError, AttributeError):
        return ""
    return str(address[0]) if address else ""


def memory_stream_pair() -> tuple[MemoryByteStream, MemoryByteStream]:
    a_send, b_receive = trio.open_memory_channel[bytes](64)
    b_send, a_receive = trio.open_memory_channel[bytes](64)
    return MemoryByteStream(a_send, a_receive), MemoryByteStream(b_send, b_receive)
