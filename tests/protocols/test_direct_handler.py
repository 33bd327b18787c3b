"""The direct lane's TCP side on its own: strangers are turned away, tickets work once."""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio.testing

from p2pedge.errors import PeerUnavailable, RemoteProtocolError
from p2pedge.protocols._stream import FramedStream
from p2pedge.protocols.direct import codec
from p2pedge.protocols.direct.handler import DirectLane, SealedStream, connect
from p2pedge.protocols.direct.machine import LaneLimits, TicketBook
from p2pedge.protocols.direct.tls import LaneIdentity, TlsChannel, client_context

PROTO = "/test/echo/1.0.0"


async def echo(stream: FramedStream, peer_id: str) -> None:
    while True:
        payload = await stream.receive_bytes()
        await stream.send_bytes(peer_id.encode() + b":" + payload)


async def start_lane(nursery: trio.Nursery, **kw: Any) -> DirectLane:
    lane = DirectLane(host="127.0.0.1", limits=LaneLimits(**kw))
    lane.enable(PROTO, echo)
    await lane.start(nursery)
    return lane


def ticket_for(lane: DirectLane, ticket: bytes, secret: bytes) -> codec.Ticket:
    assert lane.identity is not None
    return codec.Ticket(lane.port, ticket, secret, lane.identity.fingerprint)


async def dial(lane: DirectLane, ticket: bytes, secret: bytes) -> SealedStream:
    return await connect("127.0.0.1", ticket_for(lane, ticket, secret), timeout=5)


async def test_ticket_holder_gets_a_tls_stream_bound_to_its_peer_id() -> None:
    async with trio.open_nursery() as nursery:
        lane = await start_lane(nursery)
        issued = lane.book.issue("peer-a", PROTO, trio.current_time())
        assert not isinstance(issued, str)
        stream = await dial(lane, *issued)
        await stream.send_bytes(b"x" * 5000)
        assert await stream.receive_bytes(timeout=5) == b"peer-a:" + b"x" * 5000
        assert lane.accepted == 1
        await stream.close()
        nursery.cancel_scope.cancel()


async def test_strangers_and_reused_tickets_are_refused_and_the_lane_goes_on() -> None:
    async with trio.open_nursery() as nursery:
        lane = await start_lane(nursery)
        http = b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n"
        for junk in (http, codec.MAGIC + b"\x00" * 16 + b"zz"):
            tcp = await trio.open_tcp_stream("127.0.0.1", lane.port)
            await tcp.send_all(junk)
            assert await tcp.receive_some(100) == b""  # closed on us
            await tcp.aclose()
        issued = lane.book.issue("peer-a", PROTO, trio.current_time())
        assert not isinstance(issued, str)
        # someone who saw the ticket id on the wire, without the secret: TLS works, the
        # secret does not, and the ticket is spent
        with pytest.raises(PeerUnavailable):
            await dial(lane, issued[0], bytes(32))
        assert lane.rejected == 3 and lane.accepted == 0
        # the real holder must ask for a new one
        issued = lane.book.issue("peer-a", PROTO, trio.current_time())
        assert not isinstance(issued, str)
        stream = await dial(lane, *issued)
        await stream.send_bytes(b"ok")
        assert await stream.receive_bytes(timeout=5) == b"peer-a:ok"
        again = await trio.open_tcp_stream("127.0.0.1", lane.port)
        await again.send_all(codec.hello_prefix(issued[0]))
        assert await again.receive_some(100) == b""  # refused before any TLS
        assert (lane.accepted, lane.rejected) == (1, 4)
        nursery.cancel_scope.cancel()


async def test_a_forged_frame_mid_stream_ends_only_that_connection() -> None:
    async with trio.open_nursery() as nursery:
        lane = await start_lane(nursery)
        streams = []
        for peer in ("peer-a", "peer-b"):
            issued = lane.book.issue(peer, PROTO, trio.current_time())
            assert not isinstance(issued, str)
            streams.append(await dial(lane, *issued))
        victim, bystander = streams
        await victim.send_bytes(b"fine")
        assert await victim.receive_bytes(timeout=5) == b"peer-a:fine"
        forged = bytearray(victim.channel.seal(b"tampered"))
        forged[-1] ^= 0xFF
        await victim.stream.write(bytes(forged))
        with pytest.raises(PeerUnavailable):
            await victim.receive_bytes(timeout=5)  # the server hung up
        await bystander.send_bytes(b"still here")
        assert await bystander.receive_bytes(timeout=5) == b"peer-b:still here"
        nursery.cancel_scope.cancel()


async def test_a_silent_connection_is_dropped_after_the_hello_timeout() -> None:
    clock = trio.testing.MockClock(autojump_threshold=0)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            lane = await start_lane(nursery, hello_timeout=5.0)
            tcp = await trio.open_tcp_stream("127.0.0.1", lane.port)
            began = trio.current_time()
            assert await tcp.receive_some(100) == b""
            assert trio.current_time() - began >= 5.0
            assert lane.rejected == 1
            nursery.cancel_scope.cancel()

    # trio.run inside a test: the mock clock must own the whole run
    await trio.to_thread.run_sync(lambda: trio.run(main, clock=clock))


async def test_expired_tickets_and_unknown_protocols_are_refused() -> None:
    async with trio.open_nursery() as nursery:
        lane = await start_lane(nursery)
        server_side, client_side = _framed_pair()
        nursery.start_soon(lane.handle_ticket, server_side, "peer-b")
        await client_side.send(codec.encode_request(codec.TicketRequest("/not/served")))
        refusal = codec.decode_ticket(await client_side.receive(timeout=5))
        assert refusal.port == 0 and "not served" in refusal.reason
        issued = lane.book.issue("peer-b", PROTO, trio.current_time() - lane.book.ttl - 1)
        assert not isinstance(issued, str)
        with pytest.raises(PeerUnavailable):
            await dial(lane, *issued)
        assert (lane.accepted, lane.rejected) == (0, 1)
        nursery.cancel_scope.cancel()


async def test_an_oversized_ticket_request_is_refused_unread() -> None:
    async with trio.open_nursery() as nursery:
        lane = await start_lane(nursery)
        server_side, client_side = _framed_pair()
        done = trio.Event()

        async def serve() -> None:
            await lane.handle_ticket(server_side, "peer-c")
            done.set()

        nursery.start_soon(serve)
        padded = codec.encode_request(codec.TicketRequest(PROTO)) | {"pad": b"x" * 2000}
        await client_side.send(padded)
        await done.wait()
        assert len(lane.book) == 0  # no ticket for a frame over the limit
        control_server, control_client = _framed_pair()
        nursery.start_soon(lane.handle_ticket, control_server, "peer-c")
        await control_client.send(codec.encode_request(codec.TicketRequest(PROTO)))
        assert codec.decode_ticket(await control_client.receive(timeout=5)).port == lane.port
        nursery.cancel_scope.cancel()


def _framed_pair() -> tuple[FramedStream, FramedStream]:
    from p2pedge.protocols._stream import memory_stream_pair

    left, right = memory_stream_pair()
    return FramedStream(left), FramedStream(right)


async def test_a_handler_that_fails_ends_only_its_connection() -> None:
    """Whatever a lane handler raises (a peer's bad message, or a bug of ours) stays in its
    connection: the accept loop runs in the node's nursery and must not take it down."""

    async def explode(stream: FramedStream, peer_id: str) -> None:
        payload = await stream.receive_bytes()
        if payload == b"protocol":
            raise RemoteProtocolError("the peer broke the protocol")
        raise ValueError("a bug in our code")

    async with trio.open_nursery() as nursery:
        lane = await start_lane(nursery)
        lane.enable("/test/explode/1.0.0", explode)
        for payload in (b"protocol", b"bug"):
            issued = lane.book.issue("peer-a", "/test/explode/1.0.0", trio.current_time())
            assert not isinstance(issued, str)
            stream = await dial(lane, *issued)
            await stream.send_bytes(payload)
            with pytest.raises(PeerUnavailable):
                await stream.receive_bytes(timeout=5)  # closed on us
        issued = lane.book.issue("peer-b", PROTO, trio.current_time())
        assert not isinstance(issued, str)
        stream = await dial(lane, *issued)
        await stream.send_bytes(b"still here")
        assert await stream.receive_bytes(timeout=5) == b"peer-b:still here"
        assert lane.accepted == 3
        nursery.cancel_scope.cancel()


async def test_handshakes_are_charged_to_the_source_address() -> None:
    async with trio.open_nursery() as nursery:
        lane = await start_lane(nursery, handshakes_per_source=2, hello_timeout=30.0)
        silent = [
            await trio.open_tcp_stream("127.0.0.1", lane.port, local_address="127.0.0.3")
            for _ in range(3)
        ]
        assert await silent[2].receive_some(100) == b""  # the third is refused at once
        assert lane.handshakes.held(source="127.0.0.3") == 2

        async def where(stream: FramedStream, peer_id: str) -> None:
            await stream.send_bytes(stream.source.encode())

        lane.enable("/test/where/1.0.0", where)
        issued = lane.book.issue("peer-a", "/test/where/1.0.0", trio.current_time())
        assert not isinstance(issued, str)
        stream = await dial(lane, *issued)  # from 127.0.0.1: its own share
        assert await stream.receive_bytes(timeout=5) == b"127.0.0.1"  # what quotas key on
        for tcp in silent:
            await tcp.aclose()
        nursery.cancel_scope.cancel()


async def test_a_lane_with_another_certificate_never_learns_the_secret() -> None:
    """A man in the middle who knows the ticket id (it travels in clear) and answers on the
    lane port with its own certificate: the client refuses at the handshake."""
    seen: list[bytes] = []
    recorded = trio.Event()

    async def record(stream: FramedStream, peer_id: str) -> None:
        seen.append(await stream.receive_bytes())
        recorded.set()

    async with trio.open_nursery() as nursery:
        real = await start_lane(nursery)
        impostor = DirectLane(host="127.0.0.1", book=TicketBook())
        impostor.enable(PROTO, record)
        await impostor.start(nursery)
        issued = impostor.book.issue("victim", PROTO, trio.current_time())
        assert not isinstance(issued, str)  # worst case: it even knows the secret
        assert real.identity is not None and impostor.identity is not None
        pinned_real = codec.Ticket(impostor.port, *issued, real.identity.fingerprint)
        with pytest.raises(RemoteProtocolError, match="pinned"):
            await connect("127.0.0.1", pinned_real, timeout=5)
        assert (impostor.accepted, seen) == (0, [])
        # the same lane with its own certificate pinned: accepted
        issued = impostor.book.issue("victim", PROTO, trio.current_time())
        assert not isinstance(issued, str)
        stream = await dial(impostor, *issued)
        await stream.send_bytes(b"after")
        await stream.close()
        assert impostor.accepted == 1
        with trio.fail_after(5):
            await recorded.wait()
        assert seen == [b"after"]
        nursery.cancel_scope.cancel()


async def test_a_lane_identity_is_made_once_per_lane() -> None:
    identity = LaneIdentity()
    async with trio.open_nursery() as nursery:
        lane = DirectLane(host="127.0.0.1", identity=identity)
        await lane.start(nursery)
        assert lane.identity is identity
        other = await start_lane(nursery)
        assert other.identity is not None and other.identity.fingerprint != identity.fingerprint
        nursery.cancel_scope.cancel()


async def test_before_its_secret_a_client_may_send_no_more_than_a_secret() -> None:
    """Someone who saw a ticket id on the wire can get through TLS, but the server then
    admits one secret-sized frame: a bigger one is refused at its prefix, not awaited."""
    async with trio.open_nursery() as nursery:
        lane = await start_lane(nursery, hello_timeout=60.0)
        issued = lane.book.issue("peer-a", PROTO, trio.current_time())
        assert not isinstance(issued, str) and lane.identity is not None
        channel = TlsChannel(client_context(), server=False, pin=lane.identity.fingerprint)
        tcp = await trio.open_tcp_stream("127.0.0.1", lane.port)
        out, done = channel.handshake()
        await tcp.send_all(codec.hello_prefix(issued[0]) + out)
        while not done:
            out, done = channel.handshake(await tcp.receive_some(1 << 16))
            await tcp.send_all(out)
        await tcp.send_all(channel.seal(bytes(1 << 20))[: 17 << 10])  # the first record
        with trio.fail_after(5):  # well before the hello timeout
            try:
                assert await tcp.receive_some(100) == b""
            except trio.BrokenResourceError:
                pass  # closed with our bytes unread: a reset
        assert lane.rejected == 1 and lane.handshakes.held(source="127.0.0.1") == 0
        issued = lane.book.issue("peer-b", PROTO, trio.current_time())
        assert not isinstance(issued, str)
        stream = await dial(lane, *issued)
        await stream.send_bytes(b"x" * 100_000)  # after the secret, full-sized frames
        assert await stream.receive_bytes(timeout=5) == b"peer-b:" + b"x" * 100_000
        nursery.cancel_scope.cancel()
