"""The lane's socket I/O: immediate reads and writes skip trio's scheduler, yet a flood
still yields, a blocked read wakes when the stream closes, and a closed stream refuses
I/O instead of touching a recycled file descriptor; the fallback to trio's own calls
(for Windows, where sockets are not descriptors) behaves the same. Real loopback TCP."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing

from p2pedge.protocols.direct.handler import YIELD_EVERY, SocketByteStream


@asynccontextmanager
async def tcp_pair(direct: bool) -> AsyncIterator[tuple[SocketByteStream, trio.SocketStream]]:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    client = await trio.open_tcp_stream("127.0.0.1", port)
    server = await listeners[0].accept()
    try:
        yield SocketByteStream(client, direct=direct), server
    finally:
        await client.aclose()
        await server.aclose()
        await listeners[0].aclose()


@pytest.fixture(params=[True, False], ids=["descriptor I/O", "trio's calls (Windows)"])
async def pair(
    request: pytest.FixtureRequest,
) -> AsyncIterator[tuple[SocketByteStream, trio.SocketStream]]:
    async with tcp_pair(request.param) as streams:
        yield streams


async def test_round_trip(pair: tuple[SocketByteStream, trio.SocketStream]) -> None:
    ours, theirs = pair
    await ours.write(b"x" * 100_000)
    got = bytearray()
    while len(got) < 100_000:
        got += await theirs.receive_some(1 << 16)
    await theirs.send_all(b"pong")
    assert bytes(got) == b"x" * 100_000 and await ours.read() == b"pong"


async def test_a_flood_of_ready_bytes_still_yields_to_other_tasks() -> None:
    async with tcp_pair(direct=True) as (ours, theirs):
        await flood(ours, theirs)


async def flood(ours: SocketByteStream, theirs: trio.SocketStream) -> None:
    reads = 4 * YIELD_EVERY
    await theirs.send_all(b"y" * reads)
    assert await ours.read(1) == b"y"  # wait until the bytes are here
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await trio.lowlevel.checkpoint()
            ticks += 1

    async with trio.open_nursery() as nursery:
        nursery.start_soon(ticker)
        await trio.lowlevel.checkpoint()  # let the ticker start
        before = ticks
        for _ in range(reads - 1):
            assert await ours.read(1) == b"y"  # each ready at once
        during = ticks - before
        nursery.cancel_scope.cancel()
    assert 2 <= during <= reads // YIELD_EVERY + 1


async def test_a_blocked_read_wakes_when_the_stream_is_closed(
    pair: tuple[SocketByteStream, trio.SocketStream],
) -> None:
    ours, _ = pair
    woke: list[BaseException] = []

    async def reader() -> None:
        try:
            await ours.read()
        except trio.ClosedResourceError as exc:
            woke.append(exc)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader)
        await trio.testing.wait_all_tasks_blocked()
        await ours.close()
    assert len(woke) == 1


async def test_a_closed_stream_refuses_io(
    pair: tuple[SocketByteStream, trio.SocketStream],
) -> None:
    ours, _ = pair
    await ours.close()
    with pytest.raises(trio.ClosedResourceError):
        await ours.read()
    with pytest.raises(trio.ClosedResourceError):
        await ours.write(b"z")


async def test_a_peer_reset_is_a_connection_error(
    pair: tuple[SocketByteStream, trio.SocketStream],
) -> None:
    ours, theirs = pair
    await theirs.aclose()
    assert await ours.read() == b""  # orderly end first
    with pytest.raises((ConnectionError, trio.BrokenResourceError)):
        for _ in range(100):  # the kernel answers writes to a closed peer with RST, then EPIPE
            await ours.write(b"z" * 65536)
