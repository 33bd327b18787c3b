"""The blob protocol carried on a real direct lane (TLS 1.3 over loopback TCP): the same
handler, gate and quotas as on libp2p, the request limit enforced inside TLS."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio

from p2pedge.errors import Busy, LocalProtocolError, PeerUnavailable
from p2pedge.ids import ModelId
from p2pedge.models.keys import TrustStore, generate_key, public_key_hex
from p2pedge.models.manifest import Manifest
from p2pedge.models.pull import pull
from p2pedge.models.store import Store
from p2pedge.protocols._stream import FramedStream
from p2pedge.protocols.blob.codec import (
    MAX_DATA,
    MAX_REQUEST_FRAME,
    PROTOCOL_ID,
    DataResponse,
    encode_data_parts,
    encode_response,
)
from p2pedge.protocols.blob.handler import BlobService, PeerChunkSource
from p2pedge.protocols.blob.machine import BlobLimits
from p2pedge.protocols.direct import codec
from p2pedge.protocols.direct.handler import DirectLane, SealedStream, connect
from p2pedge.protocols.direct.tls import pair_in_memory
from p2pedge.quota import Limit

CHUNK = 64 * 1024
PEER = "peer-lane"


def seed(tmp_path: Path) -> tuple[Store, Manifest, TrustStore]:
    source = tmp_path / "src"
    source.mkdir()
    (source / "a.bin").write_bytes(os.urandom(5 * CHUNK + 7))
    (source / "b.bin").write_bytes(os.urandom(CHUNK // 3))
    key = generate_key()
    store = Store(tmp_path / "seed")
    manifest = store.add_model_dir(source, "lane", "1", "llm", key, chunk_size=CHUNK)
    return store, manifest, TrustStore([public_key_hex(key)])


async def serve_on_lane(nursery: trio.Nursery, service: BlobService) -> DirectLane:
    lane = DirectLane(host="127.0.0.1")
    lane.enable(PROTOCOL_ID, service.handle)
    await lane.start(nursery)
    return lane


async def dial(lane: DirectLane) -> SealedStream:
    """What a node's lanes do after asking for a ticket over libp2p."""
    issued = lane.book.issue(PEER, PROTOCOL_ID, trio.current_time())
    assert not isinstance(issued, str) and lane.identity is not None
    ticket = codec.Ticket(lane.port, *issued, lane.identity.fingerprint)
    return await connect("127.0.0.1", ticket, timeout=5)


def lane_source(lane: DirectLane, opened: list[FramedStream]) -> PeerChunkSource:
    async def open_stream() -> FramedStream:
        stream = await dial(lane)
        opened.append(stream)
        return stream

    return PeerChunkSource(open_stream, "lane peer")


async def test_a_pull_over_the_lane_is_verified_and_counted_on_the_server(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    store, manifest, trust = seed(tmp_path)
    service = BlobService(store)
    lane = await serve_on_lane(nursery, service)
    opened: list[FramedStream] = []
    source = lane_source(lane, opened)
    client = Store(tmp_path / "client")
    result = await pull(ModelId("lane", "1"), client, [source], trust, progress=False)
    await source.aclose()
    data = sum(f.size for f in manifest.files)
    assert client.has_model(manifest.model) and result.fetched_bytes == data
    for entry in manifest.files:
        assert client.blob_path(entry.sha256).read_bytes() == (
            store.blob_path(entry.sha256).read_bytes()
        )
    assert opened and all(isinstance(s, SealedStream) for s in opened)
    assert lane.accepted == len(opened)
    # every data byte written, the manifest's included, and nothing left charged
    assert service.served_bytes == data + len(manifest.to_bytes())
    assert service.served_chunks == result.fetched_chunks == 7
    assert service.bytes_in_flight.held() == 0 and service.gate.in_flight == 0


async def test_a_request_frame_over_the_limit_ends_the_lane_at_its_prefix(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    """The server's reader admits only request-sized frames inside TLS: a prefix that
    announces more ends the connection before any of the body is awaited."""
    store, _, _ = seed(tmp_path)
    lane = await serve_on_lane(nursery, BlobService(store))
    stream = await dial(lane)
    # a 64 KiB frame, of which only the first TLS record (prefix and 16 KiB) is sent: the
    # server must refuse at the prefix, not wait for the rest
    sealed = stream.channel.seal(bytes(64 * MAX_REQUEST_FRAME), 1 << 20)
    await stream.socket.write(sealed[: 17 << 10])
    with trio.fail_after(5), pytest.raises(PeerUnavailable):
        await stream.receive_bytes()


async def test_lane_requests_meet_the_same_quota_and_gate_as_on_libp2p(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    store, manifest, _ = seed(tmp_path)
    tight = Limit(per_peer=1 << 20, per_source=CHUNK // 2, total=1 << 20)
    service = BlobService(store, limits=BlobLimits(bytes_in_flight=tight))
    lane = await serve_on_lane(nursery, service)
    source = lane_source(lane, [])
    big = next(f for f in manifest.files if f.size > CHUNK)
    with pytest.raises(Busy) as refused:
        await source.fetch_chunk(big.sha256, 0, CHUNK)
    assert (refused.value.limit, refused.value.scope) == ("blob.bytes_in_flight", "source")
    # the gate saw the lane's peer id (the ticket's), not an anonymous connection
    assert service.gate.tokens(PEER) < service.gate.limits.burst
    small = next(f for f in manifest.files if f.size < CHUNK // 2 - 64)
    assert len(await source.fetch_chunk(small.sha256, 0, CHUNK)) == small.size
    await source.aclose()


@pytest.mark.parametrize("size", [0, 255, 256, 65535, 65536, MAX_DATA])
def test_a_reply_in_parts_is_the_same_bytes_as_the_encoded_reply(size: int) -> None:
    data = os.urandom(size)
    head, body = encode_data_parts(data)
    assert body is data  # not copied
    assert head + body == encode_response(DataResponse(data))


def test_a_frame_sealed_in_parts_arrives_as_one_frame_within_its_limit() -> None:
    client, server = pair_in_memory(max_frame=1 << 20)
    big = os.urandom(100_000)
    assert server.feed(client.seal_parts((b"ab", big, b"c", big))) == [b"ab" + big + b"c" + big]
    assert server.feed(client.seal_parts((b"small", b"parts"))) == [b"smallparts"]
    with pytest.raises(LocalProtocolError):
        client.seal_parts((big, big), max_frame=150_000)
    assert server.feed(client.seal(b"after")) == [b"after"]  # the channel is still in step
    pieces = list(client.seal_pieces((b"head", big, big), piece=30_000))
    assert len(pieces) == 8  # 4 pieces of each big part, the head riding with the first
    assert server.feed(b"".join(pieces)) == [b"head" + big + big]
