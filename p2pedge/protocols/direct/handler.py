"""Trio glue for the direct lane: the TCP listener that redeems tickets, and the dialer.

A lane stream is a :class:`~p2pedge.protocols._stream.FramedStream` whose frames travel
inside TLS 1.3 (:mod:`~p2pedge.protocols.direct.tls`), so protocol handlers serve it
exactly as they serve a libp2p stream. Every failure of a stranger on the TCP port (wrong
magic, unknown ticket, failed handshake, wrong secret, forged record, silence) ends only
that connection, and every connection's handler runs contained
(:func:`~p2pedge.protocols._stream.contain`). Connections not yet authenticated are
charged to their source address (:class:`~p2pedge.protocols.direct.machine.LaneLimits`),
so silent connections from one address cannot crowd out other peers' handshakes.
"""

from __future__ import annotations

import hmac
import logging
import os
from collections.abc import Awaitable, Callable
from functools import partial

import trio

from p2pedge.errors import Busy, PeerUnavailable, RemoteProtocolError
from p2pedge.protocols._stream import READ_CHUNK, FramedStream, contain
from p2pedge.protocols.direct import codec
from p2pedge.protocols.direct.machine import LaneLimits, TicketBook
from p2pedge.protocols.direct.tls import LaneIdentity, TlsChannel, client_context
from p2pedge.quota import Quota
from p2pedge.wire.framing import DEFAULT_MAX_FRAME

log = logging.getLogger(__name__)

StreamHandler = Callable[[FramedStream, str], Awaitable[None]]
DEFAULT_DIAL_TIMEOUT = 2.0
YIELD_EVERY = 16
SEND_PIECE = 1 << 20  # plaintext sealed per write of a bulk frame (send_parts)
DIRECT_FD_IO = os.name == "posix"  # os.read / os.write work on socket descriptors here
_SOCKET_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)


class SocketByteStream:
    """:class:`~p2pedge.protocols._stream.ByteStream` over a trio TCP stream's socket.

    A read or write that can complete at once does so without yielding to trio's
    scheduler; otherwise it waits for readiness as trio does. trio's own socket calls
    pass through the scheduler on every call, which is slow when a shard step has just
    flushed the CPU caches (a 2.4 KB send: 283 us through ``send_all`` against 114 us
    here, ``benchmarks/hop_cold.py``), several times per hop. Every :data:`YIELD_EVERY`
    immediate calls still yield once, so a flooding peer cannot keep the loop from its
    other tasks; a closed stream raises ``ClosedResourceError``. Where sockets are not
    file descriptors (Windows), or with ``direct=False``, trio's own calls are used.
    """

    def __init__(self, stream: trio.SocketStream, *, direct: bool = DIRECT_FD_IO) -> None:
        self.socket_stream = stream
        self.direct = direct
        self._immediate = 0

    def _fd(self) -> int:
        fd = self.socket_stream.socket.fileno()
        if fd < 0:
            raise trio.ClosedResourceError("the direct lane socket is closed")
        return fd

    async def _fair(self) -> None:
        self._immediate += 1
        if self._immediate >= YIELD_EVERY:
            self._immediate = 0
            await trio.lowlevel.checkpoint()

    async def read(self, n: int | None = None) -> bytes:
        if not self.direct:
            return await self.socket_stream.receive_some(n or READ_CHUNK)
        while True:
            try:
                data = os.read(self._fd(), n or READ_CHUNK)
            except BlockingIOError:
                self._immediate = 0
                await trio.lowlevel.wait_readable(self._fd())
                continue
            except ConnectionError:
                raise
            except OSError as exc:
                raise trio.BrokenResourceError(f"direct lane read failed: {exc!r}") from exc
            await self._fair()
            return data

    async def write(self, data: bytes) -> None:
        if not self.direct:
            await self.socket_stream.send_all(data)
            return
        view = memoryview(data)
        while view:
            try:
                view = view[os.write(self._fd(), view) :]
            except BlockingIOError:
                self._immediate = 0
                await trio.lowlevel.wait_writable(self._fd())
            except ConnectionError:
                raise
            except OSError as exc:
                raise trio.BrokenResourceError(f"direct lane write failed: {exc!r}") from exc
        await self._fair()

    async def close(self) -> None:
        await self.socket_stream.aclose()

    async def reset(self) -> None:
        await self.socket_stream.aclose()


class SealedStream(FramedStream):
    """Frames inside the lane's TLS session; same interface as a libp2p framed stream.

    :meth:`reframed` gives a view of the same session with its own frame limit (frames
    it reads are refused above it as soon as their prefix is decrypted), so a handler
    written for libp2p streams (the blob service reads 1 KiB requests and writes 4 MiB
    replies) runs unchanged on the lane."""

    def __init__(
        self,
        stream: trio.SocketStream | SocketByteStream,
        channel: TlsChannel,
        source: str = "",
        *,
        max_frame: int | None = None,
    ) -> None:
        if isinstance(stream, trio.SocketStream):
            stream = SocketByteStream(stream)
        limit = channel.max_frame if max_frame is None else max_frame
        super().__init__(stream, max_frame=limit, source=source)
        self.socket = stream
        self.channel = channel

    def _encode(self, payload: bytes) -> bytes:
        return self.channel.seal(payload, self.max_frame)

    async def send_parts(self, *parts: bytes) -> None:
        """One frame made of ``parts`` (bulk replies: a blob chunk behind its msgpack
        head), never joined into one buffer, encrypted and written ``SEND_PIECE`` bytes at
        a time so the reader decrypts one piece while the next is encrypted. Like every
        send on a stream, not to be called concurrently with another."""
        try:
            for sealed in self.channel.seal_pieces(parts, self.max_frame, piece=SEND_PIECE):
                await self.stream.write(sealed)
        except self._errors as exc:
            raise PeerUnavailable(f"stream write failed: {exc!r}") from exc

    def _decode(self, chunk: bytes) -> list[bytes]:
        """A record that fails authentication (or a hostile length) ends the lane: TLS
        cannot resynchronise, so the peer is treated as gone, not merely wrong."""
        try:
            return self.channel.feed(chunk, self.max_frame)
        except RemoteProtocolError as exc:
            raise PeerUnavailable(f"direct lane broken: {exc}") from exc

    def reframed(self, max_frame: int) -> SealedStream:
        """The same TLS session (frames already decrypted included) under another limit."""
        view = SealedStream(self.socket, self.channel, self.source, max_frame=max_frame)
        view._ready = self._ready
        return view

    def push_received(self, data: bytes = b"") -> None:
        """Bytes read before this object existed (what arrived with the handshake)."""
        self._ready.extend(self._decode(data))


class DirectLane:
    """Server half: issues tickets over libp2p, accepts TLS connections on TCP.

    ``identity`` (made in a thread at :meth:`start` when not given) is the lane's
    certificate; it lives as long as this object."""

    def __init__(
        self,
        *,
        host: str,
        port: int = 0,
        book: TicketBook | None = None,
        limits: LaneLimits | None = None,
        identity: LaneIdentity | None = None,
    ) -> None:
        self.host = host
        self.identity = identity
        self.limits = limits or LaneLimits()
        self.book = book if book is not None else self.limits.book()  # empty is falsy
        self.hello_timeout = self.limits.hello_timeout
        self.handshakes = Quota("direct.handshakes", self.limits.handshakes())
        self.handlers: dict[str, StreamHandler] = {}
        self.port = port
        self.max_frame = DEFAULT_MAX_FRAME
        self.accepted = 0
        self.rejected = 0

    async def start(self, nursery: trio.Nursery) -> None:
        """Listen (port 0: the OS chooses); connections live in ``nursery``."""
        if self.identity is None:
            self.identity = await trio.to_thread.run_sync(LaneIdentity)
        listeners = await trio.open_tcp_listeners(self.port, host=self.host)
        self.port = int(listeners[0].socket.getsockname()[1])
        serve = partial(trio.serve_listeners, self._serve_tcp, listeners, handler_nursery=nursery)
        nursery.start_soon(serve)

    def enable(self, protocol: str, handler: StreamHandler) -> None:
        self.handlers[protocol] = handler

    async def handle_ticket(self, framed: FramedStream, peer_id: str) -> None:
        """libp2p side: one ticket request, one answer (a refusal is an answer too)."""
        framed = framed.reframed(codec.MAX_TICKET_FRAME)  # nothing read from it yet
        try:
            request = codec.decode_request(await framed.receive(timeout=self.hello_timeout))
        except RemoteProtocolError as exc:
            log.info("bad direct-lane ticket request from %s: %s", peer_id, exc)
            return
        if self.identity is None or request.protocol not in self.handlers:
            reply = codec.refusal(f"{request.protocol} is not served on the lane")
        else:
            issued = self.book.issue(peer_id, request.protocol, trio.current_time())
            if isinstance(issued, str):
                reply = codec.refusal(issued)
            else:
                reply = codec.Ticket(self.port, *issued, self.identity.fingerprint)
        await framed.send(codec.encode_ticket(reply))

    async def _serve_tcp(self, tcp: trio.SocketStream) -> None:
        """One accepted connection, contained: whatever it does ends only itself."""
        source = tcp_source(tcp)
        try:
            await contain(self._connection(tcp, source), "direct lane connection", source)
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                await tcp.aclose()

    async def _connection(self, tcp: trio.SocketStream, source: str) -> None:
        try:
            grant = self.handshakes.acquire(source, source)
        except Busy as busy:
            self.rejected += 1
            log.info("direct lane: handshake from %s refused: %s", source, busy)
            return
        try:
            accepted = await self._hello(tcp, source)
        finally:
            self.handshakes.release(grant)
        if accepted is None:
            self.rejected += 1
            return
        stream, peer_id, protocol = accepted
        self.accepted += 1
        await contain(self.handlers[protocol](stream, peer_id), f"direct {protocol}", peer_id)

    async def _hello(
        self, tcp: trio.SocketStream, source: str
    ) -> tuple[SealedStream, str, str] | None:
        """Read and check the hello within the deadline; None for anything wrong."""
        with trio.move_on_after(self.hello_timeout):
            try:
                buffer = bytearray()
                while len(buffer) < codec.HELLO_PREFIX:
                    chunk = await tcp.receive_some(READ_CHUNK)
                    if not chunk:
                        return None
                    buffer += chunk
                ticket = codec.hello_ticket(bytes(buffer[: codec.HELLO_PREFIX]))
                grant = self.book.redeem(ticket, trio.current_time())
                if grant is None or grant.protocol not in self.handlers or self.identity is None:
                    log.info("direct lane: unknown or expired ticket")
                    return None
                channel = TlsChannel(
                    self.identity.context, server=True, max_frame=codec.SECRET_BYTES
                )
                await _handshake(tcp, channel, bytes(buffer[codec.HELLO_PREFIX :]))
                stream = SealedStream(tcp, channel, source)
                stream.push_received()
                if not hmac.compare_digest(await stream.receive_bytes(), grant.secret):
                    raise RemoteProtocolError("wrong ticket secret")
                channel.reframe(self.max_frame)  # the client waits for the greeting first
                stream.max_frame = self.max_frame
                await stream.send_bytes(codec.GREETING)
                return stream, grant.peer_id, grant.protocol
            except (RemoteProtocolError, PeerUnavailable, *_SOCKET_ERRORS) as exc:
                log.info("direct lane: hello refused: %s", exc)
                return None
        log.info("direct lane: no hello within %.3g s", self.hello_timeout)
        return None


def tcp_source(tcp: trio.SocketStream) -> str:
    """The remote IP of an accepted TCP connection ("" if it is already gone)."""
    try:
        return str(tcp.socket.getpeername()[0])
    except OSError:
        return ""


def remote_host(framed: FramedStream) -> str:
    """The IP the libp2p stream is connected to (where the lane listens too)."""
    get = getattr(framed.stream, "get_remote_address", None)
    address = get() if get is not None else None
    if not address:
        raise PeerUnavailable("the libp2p stream has no IP address for a direct lane")
    return str(address[0])


async def open_direct(
    ticket_stream: FramedStream,
    protocol: str,
    *,
    timeout: float,
    dial_timeout: float = DEFAULT_DIAL_TIMEOUT,
    host: str | None = None,
    local_address: str | None = None,
) -> SealedStream:
    """Ask for a ticket on ``ticket_stream`` (libp2p), then dial and greet the lane
    (from ``local_address`` when given: a machine with several addresses picks one).

    The dial has its own short deadline: a firewalled lane port should cost a moment
    before the caller falls back to libp2p, not the whole request timeout.
    """
    ticket_stream = ticket_stream.reframed(codec.MAX_TICKET_FRAME)
    await ticket_stream.send(codec.encode_request(codec.TicketRequest(protocol)))
    ticket = codec.decode_ticket(await ticket_stream.receive(timeout=timeout))
    if ticket.port == 0:
        raise PeerUnavailable(f"direct lane refused: {ticket.reason}")
    host = host or remote_host(ticket_stream)
    return await connect(
        host, ticket, timeout=timeout, dial_timeout=dial_timeout, local_address=local_address
    )


async def connect(
    host: str,
    ticket: codec.Ticket,
    *,
    timeout: float,
    dial_timeout: float = DEFAULT_DIAL_TIMEOUT,
    local_address: str | None = None,
) -> SealedStream:
    """Dial the lane at ``host`` with ``ticket``: TLS to the pinned certificate, then the
    secret; the stream is returned once the server has greeted it."""
    try:
        with trio.fail_after(min(timeout, dial_timeout)):
            tcp = await trio.open_tcp_stream(host, ticket.port, local_address=local_address)
    except (trio.TooSlowError, OSError) as exc:
        where = f"{host}:{ticket.port}"
        raise PeerUnavailable(f"cannot dial the direct lane at {where}: {exc}") from exc
    channel = TlsChannel(client_context(), server=False, pin=ticket.fingerprint)
    try:
        with trio.fail_after(timeout):
            await _handshake(tcp, channel, b"", first=codec.hello_prefix(ticket.ticket))
        stream = SealedStream(tcp, channel, host)
        stream.push_received()
        await stream.send_bytes(ticket.secret)
        codec.check_greeting(await stream.receive_bytes(timeout=timeout))
    except trio.TooSlowError as exc:
        with trio.CancelScope(shield=True):
            await tcp.aclose()
        raise PeerUnavailable(f"direct lane handshake took over {timeout:.3g} s") from exc
    except BaseException:
        with trio.CancelScope(shield=True):
            await tcp.aclose()
        raise
    return stream


async def _handshake(
    tcp: trio.SocketStream, channel: TlsChannel, received: bytes, first: bytes = b""
) -> None:
    """Drive ``channel``'s TLS handshake over ``tcp`` (``first``: bytes to send ahead of
    it). Bytes past the handshake stay in the channel. A peer closing midway is gone."""
    try:
        out, done = channel.handshake(received)
        await tcp.send_all(first + out)
        while not done:
            chunk = await tcp.receive_some(READ_CHUNK)
            if not chunk:
                raise PeerUnavailable("the direct lane closed during its handshake")
            out, done = channel.handshake(chunk)
            if out:
                await tcp.send_all(out)
    except _SOCKET_ERRORS as exc:
        raise PeerUnavailable(f"the direct lane failed during its handshake: {exc!r}") from exc
