"""Blob service and peer source over in-process streams (no sockets): the trio glue."""

from __future__ import annotations

import os
from pathlib import Path

import msgpack
import pytest
import trio

from p2pedge.errors import Busy, RemoteProtocolError
from p2pedge.ids import ModelId
from p2pedge.models.keys import TrustStore, generate_key, public_key_hex
from p2pedge.models.manifest import Manifest
from p2pedge.models.pull import pull
from p2pedge.models.sources import SourceMissing
from p2pedge.models.store import Store
from p2pedge.protocols._stream import FramedStream, memory_stream_pair
from p2pedge.protocols.blob.codec import MAX_REQUEST_FRAME, ErrorResponse, decode_response, frame
from p2pedge.protocols.blob.handler import BlobService, PeerChunkSource
from p2pedge.protocols.blob.machine import BlobServerGate, GateLimits

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
    client, server = memory_stream_pair()
    nursery.start_soon(service.handle, FramedStream(server), "peer-a")

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
        await source.fetch_chunk(entry.sha256, 10, CHUNK)
    with pytest.raises(SourceMissing):
        await source.fetch_manifest(ModelId("other"))
    assert service.served_chunks == 2


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
    with pytest.raises(Busy):
        await source.fetch_chunk(digest, 1, CHUNK)
    assert gate.in_flight == 0


async def test_malformed_request_gets_bad_request_and_close(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    store, _, _ = seed_store(tmp_path)
    client, server = memory_stream_pair()
    done = trio.Event()

    async def serve() -> None:
        await BlobService(store).handle(FramedStream(server), "peer-b")
        done.set()

    nursery.start_soon(serve)
    stream = FramedStream(client)
    await client.write(frame(msgpack.packb({"op": "delete"}), MAX_REQUEST_FRAME))
    answer = decode_response(await stream.receive_bytes(timeout=5))
    assert isinstance(answer, ErrorResponse) and answer.code == "bad_request"
    await done.wait()


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
