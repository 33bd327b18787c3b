"""The direct lane's TCP side on its own: strangers are turned away, tickets work once."""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio.testing

from p2pedge.errors import PeerUnavailable, RemoteProtocolError
from p2pedge.protocols._stream import FramedStream
from p2pedge.protocols.direct import codec
from p2pedge.protocols.direct.codec import SealedChannel
from p2pedge.protocols.direct.handler import DirectLane, SealedStream
from p2pedge.protocols.direct.machine import LaneLimits

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


async def dial(lane: DirectLane, ticket: bytes, key: bytes) -> SealedStream:
    tcp = await trio.open_tcp_stream("127.0.0.1", lane.port)
    channel = SealedChannel(key, client=True)
    stream = SealedStream(tcp, channel)
    await stream.stream.write(codec.client_hello(ticket, channel))
    codec.check_greeting(await stream.receive_bytes(timeout=5))
    return stream


async def test_ticket_holder_gets_a_sealed_stream_bound_to_its_peer_id() -> None:
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
        ticket = issued[0]
        wrong_key = await trio.open_tcp_stream("127.0.0.1", lane.port)
        await wrong_key.send_all(codec.client_hello(ticket, SealedChannel(bytes(32), client=True)))
        assert await wrong_key.receive_some(100) == b""
        assert lane.rejected == 3
        # the forged hello spent the ticket: the real holder must ask for a new one
        issued = lane.book.issue("peer-a", PROTO, trio.current_time())
        assert not isinstance(issued, str)
        stream = await dial(lane, *issued)
        await stream.send_bytes(b"ok")
        assert await stream.receive_bytes(timeout=5) == b"peer-a:ok"
        again = await trio.open_tcp_stream("127.0.0.1", lane.port)
        await again.send_all(codec.client_hello(issued[0], SealedChannel(issued[1], client=True)))
        assert await again.receive_some(100) == b""
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
        stale = await trio.open_tcp_stream("127.0.0.1", lane.port)
        await stale.send_all(codec.client_hello(issued[0], SealedChannel(issued[1], client=True)))
        assert await stale.receive_some(100) == b""
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
