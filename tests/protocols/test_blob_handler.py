"""Blob service and peer source over in-process streams (no sockets): the trio glue."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import msgpack
import pytest
import trio
import trio.testing

from p2pedge.errors import (
    Busy,
    FrameTooLarge,
    PeerTimeout,
    PeerUnavailable,
    RemoteProtocolError,
)
from p2pedge.ids import ModelId
from p2pedge.models.keys import TrustStore, generate_key, public_key_hex
from p2pedge.models.manifest import Manifest
from p2pedge.models.pull import pull
from p2pedge.models.sources import SourceMissing
from p2pedge.models.store import Store
from p2pedge.protocols._stream import (
    FramedStream,
    MemoryByteStream,
    contain,
    memory_stream_pair,
)
from p2pedge.protocols.blob.codec import (
    MAX_CHUNK,
    MAX_REQUEST_FRAME,
    MAX_RESPONSE_FRAME,
    ChunkRequest,
    DataResponse,
    ErrorResponse,
    decode_response,
    encode_request,
    frame,
)
from p2pedge.protocols.blob.handler import BlobService, PeerChunkSource
from p2pedge.protocols.blob.machine import BlobLimits, BlobServerGate, GateLimits
from p2pedge.quota import Limit

CHUNK = 4096


def seed_store(tmp_path: Path) -> tuple[Store, Manifest, TrustStore]:
    source = tmp_path / "src"
    source.mkdir()
    (source / "w.bin").write_bytes(os.urandom(9 * CHUNK + 1))
    key = generate_key()
    store = Store(tmp_path / "seed")
    manifest = store.add_model_dir(source, "tiny", "1", "llm", key, chunk_size=CHUNK)
    return store, manifest, TrustStore([public_key_hex(key)])


async def connected_source(nursery: trio.Nursery, service: BlobService) -> PeerChunkSource:
    """A source on one in-process stream to ``service``; the handler runs contained, as
    the node runs it, so a peer's protocol error ends only that stream."""
    client, server = memory_stream_pair()
    nursery.start_soon(contain, service.handle(FramedStream(server), "peer-a"), "blob", "a")

    async def open_stream() -> FramedStream:
        return FramedStream(client)

    return PeerChunkSource(open_stream, "memory peer", max_streams=1)


async def test_serves_chunks_and_manifests(tmp_path: Path, nursery: trio.Nursery) -> None:
    store, manifest, _ = seed_store(tmp_path)
    service = BlobService(store)
    source = await connected_source(nursery, service)
    entry = manifest.files[0]
    blob = store.blob_path(entry.sha256).read_bytes()
    assert await source.fetch_chunk(entry.sha256, 0, CHUNK) == blob[:CHUNK]
    assert await source.fetch_chunk(entry.sha256, 9, CHUNK) == blob[9 * CHUNK :]
    assert await source.fetch_manifest(ModelId("tiny")) == manifest.to_bytes()
    with pytest.raises(SourceMissing):
        await source.fetch_chunk("00" * 32, 0, CHUNK)
    with pytest.raises(SourceMissing):
        await source.fetch_manifest(ModelId("other"))
    assert service.served_chunks == 2
    assert service.bytes_in_flight.held() == 0


async def test_pull_through_peer_source(tmp_path: Path, nursery: trio.Nursery) -> None:
    store, manifest, trust = seed_store(tmp_path)
    source = await connected_source(nursery, BlobService(store))
    client = Store(tmp_path / "client")
    result = await pull(ModelId("tiny"), client, [source], trust, progress=False)
    assert result.by_source == {"memory peer": 10}
    assert client.has_model(manifest.model)


async def test_busy_when_over_rate(tmp_path: Path, nursery: trio.Nursery) -> None:
    store, manifest, _ = seed_store(tmp_path)
    gate = BlobServerGate(GateLimits(rate=1e-6, burst=1.0))
    source = await connected_source(nursery, BlobService(store, gate, clock=lambda: 0.0))
    digest = manifest.files[0].sha256
    assert len(await source.fetch_chunk(digest, 0, CHUNK)) == CHUNK
    with pytest.raises(Busy) as refused:
        await source.fetch_chunk(digest, 1, CHUNK)
    assert (refused.value.limit, refused.value.scope) == ("blob.requests", "peer")
    assert gate.in_flight == 0


async def serve_raw(
    nursery: trio.Nursery, service: BlobService
) -> tuple[MemoryByteStream, FramedStream, list[BaseException]]:
    """A raw client end to ``service`` (the test writes bytes); what the handler raised."""
    client, server = memory_stream_pair()
    raised: list[BaseException] = []

    async def serve() -> None:
        try:
            await service.handle(FramedStream(server, source="10.0.0.9"), "peer-b")
        except RemoteProtocolError as exc:
            raised.append(exc)
        await server.close()

    nursery.start_soon(serve)
    return client, FramedStream(client, max_frame=MAX_RESPONSE_FRAME), raised


async def ends_with_bad_request(stream: FramedStream) -> str:
    answer = decode_response(await stream.receive_bytes(timeout=5))
    assert isinstance(answer, ErrorResponse) and answer.code == "bad_request"
    with pytest.raises(PeerUnavailable):  # and the server ended the stream
        await stream.receive_bytes(timeout=5)
    return answer.message


async def test_malformed_request_gets_bad_request_and_ends_stream(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    store, _, _ = seed_store(tmp_path)
    client, stream, raised = await serve_raw(nursery, BlobService(store))
    await client.write(frame(msgpack.packb({"op": "delete"}), MAX_REQUEST_FRAME))
    assert "unknown op" in await ends_with_bad_request(stream)
    assert len(raised) == 1 and "unknown op" in str(raised[0])


async def test_oversize_frame_ends_stream_with_frame_too_large(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    store, _, _ = seed_store(tmp_path)
    client, stream, raised = await serve_raw(nursery, BlobService(store))
    await client.write(struct.pack(">I", 2**31) + b"x" * 100)
    await ends_with_bad_request(stream)
    assert [type(e) for e in raised] == [FrameTooLarge]


@pytest.mark.parametrize("index", [10, 2**20, 2**32 - 1])
async def test_chunk_index_beyond_blob_refused_before_any_read(
    tmp_path: Path, nursery: trio.Nursery, index: int
) -> None:
    store, manifest, _ = seed_store(tmp_path)
    reads: list[int] = []
    store.read_range = lambda *args: reads.append(1) or b""  # type: ignore[method-assign]
    client, stream, raised = await serve_raw(nursery, BlobService(store))
    request = ChunkRequest(manifest.files[0].sha256, index, MAX_CHUNK if index > 10 else CHUNK)
    await client.write(frame(encode_request(request), MAX_REQUEST_FRAME))
    assert "beyond" in await ends_with_bad_request(stream)
    assert len(raised) == 1 and "beyond" in str(raised[0])
    assert reads == []


async def test_client_sees_out_of_range_index_as_remote_error(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    store, manifest, _ = seed_store(tmp_path)
    source = await connected_source(nursery, BlobService(store))
    with pytest.raises(RemoteProtocolError, match="bad_request"):
        await source.fetch_chunk(manifest.files[0].sha256, 10, CHUNK)


async def test_unsolicited_garbage_reply_is_remote_error(nursery: trio.Nursery) -> None:
    client, server = memory_stream_pair()

    async def liar() -> None:
        peer = FramedStream(server)
        await peer.receive_bytes()
        await peer.send_bytes(msgpack.packb({"ok": True, "data": b"x" * (2 * CHUNK)}))

    nursery.start_soon(liar)

    async def open_stream() -> FramedStream:
        return FramedStream(client)

    source = PeerChunkSource(open_stream, "liar", max_streams=1)
    with pytest.raises(RemoteProtocolError):
        await source.fetch_chunk("ab" * 32, 0, CHUNK)


class StallingStream:
    """A server end whose large writes wait until ``flowing`` is set: a client that asked
    for chunks and stopped reading (its flow-control window full)."""

    def __init__(self, inner: MemoryByteStream, flowing: trio.Event) -> None:
        self.inner = inner
        self.flowing = flowing
        self.stalled = trio.Event()

    async def read(self, n: int | None = None) -> bytes:
        return await self.inner.read(n)

    async def write(self, data: bytes) -> None:
        if len(data) > 1000:
            self.stalled.set()
            await self.flowing.wait()
        await self.inner.write(data)

    async def close(self) -> None:
        await self.inner.close()

    async def reset(self) -> None:
        await self.inner.reset()


async def test_unread_replies_hold_their_bytes_per_peer_and_source(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    store, manifest, _ = seed_store(tmp_path)
    cost = CHUNK + 64
    quota = Limit(per_peer=2 * cost, per_source=3 * cost, total=100 * cost)
    service = BlobService(store, limits=BlobLimits(bytes_in_flight=quota))
    flowing = trio.Event()
    digest = manifest.files[0].sha256

    async def ask(peer: str, source: str, index: int) -> FramedStream:
        client, server = memory_stream_pair()
        stalling = FramedStream(StallingStream(server, flowing), source=source)
        nursery.start_soon(contain, service.handle(stalling, peer), "blob", peer)
        request = encode_request(ChunkRequest(digest, index, CHUNK))
        await client.write(frame(request, MAX_REQUEST_FRAME))
        await trio.testing.wait_all_tasks_blocked()
        return FramedStream(client, max_frame=MAX_RESPONSE_FRAME)

    async def refused(stream: FramedStream) -> ErrorResponse:
        answer = decode_response(await stream.receive_bytes(timeout=5))
        assert isinstance(answer, ErrorResponse) and answer.code == "busy"
        assert answer.limit == "blob.bytes_in_flight"
        return answer

    held = [await ask("a", "10.0.0.1", i) for i in range(2)]
    assert service.bytes_in_flight.held(peer="a") == 2 * cost  # replies read, not written
    assert (await refused(await ask("a", "10.0.0.1", 2))).scope == "peer"
    held.append(await ask("b", "10.0.0.1", 3))  # another peer id: its own share...
    assert (await refused(await ask("c", "10.0.0.1", 4))).scope == "source"  # ...up to 3
    held.append(await ask("d", "10.0.0.2", 5))  # another address is served
    assert service.bytes_in_flight.held(source="10.0.0.1") == 3 * cost
    assert service.bytes_in_flight.held() == 4 * cost
    flowing.set()
    blob = store.blob_path(digest).read_bytes()
    for stream, index in zip(held, [0, 1, 3, 5], strict=True):
        answer = decode_response(await stream.receive_bytes(timeout=5))
        assert answer == DataResponse(blob[index * CHUNK : (index + 1) * CHUNK])
    await trio.testing.wait_all_tasks_blocked()  # each server task is past its write
    assert service.bytes_in_flight.held() == 0


async def test_reader_that_stops_is_cut_off_after_write_timeout(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    store, manifest, _ = seed_store(tmp_path)
    service = BlobService(store, limits=BlobLimits(write_timeout=5.0))
    client, server = memory_stream_pair()
    stalling = StallingStream(server, trio.Event())
    request = encode_request(ChunkRequest(manifest.files[0].sha256, 0, CHUNK))
    await client.write(frame(request, MAX_REQUEST_FRAME))
    raised: list[PeerTimeout] = []

    async def serve() -> None:
        try:
            await service.handle(FramedStream(stalling, source="x"), "slow")
        except PeerTimeout as exc:
            raised.append(exc)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve)
        await stalling.stalled.wait()
        assert service.bytes_in_flight.held(peer="slow") == CHUNK + 64
        started = trio.current_time()
    assert trio.current_time() - started == pytest.approx(5.0)
    assert len(raised) == 1
    assert service.bytes_in_flight.held() == 0
    assert service.gate.in_flight == 0
