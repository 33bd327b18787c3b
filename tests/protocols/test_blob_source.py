"""A peer source's streams: an idle stream is not reused once stale, and a reused stream
the server has closed meanwhile is replaced, so an honest peer never fails a request for
our stale state (in-process streams, mock clock)."""

from __future__ import annotations

import os
from pathlib import Path

import trio
import trio.testing

from p2pedge.models.keys import generate_key
from p2pedge.models.manifest import Manifest
from p2pedge.models.store import Store
from p2pedge.protocols._stream import FramedStream, contain, memory_stream_pair
from p2pedge.protocols.blob.handler import BlobService, PeerChunkSource
from p2pedge.protocols.blob.machine import BlobLimits

CHUNK = 4096


class Server:
    """Each ``open_stream`` is a fresh in-process stream to ``service``, ended as a node
    ends it: the handler contained, then the server's end closed."""

    def __init__(self, nursery: trio.Nursery, service: BlobService) -> None:
        self.nursery = nursery
        self.service = service
        self.live = 0

    async def open_stream(self) -> FramedStream:
        client, server = memory_stream_pair()

        async def run() -> None:
            self.live += 1
            await contain(self.service.handle(FramedStream(server), "p"), "blob", "p")
            await server.close()
            self.live -= 1

        self.nursery.start_soon(run)
        return FramedStream(client)


def seed(tmp_path: Path) -> tuple[Store, Manifest]:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "w.bin").write_bytes(os.urandom(4 * CHUNK))
    store = Store(tmp_path / "seed")
    return store, store.add_model_dir(
        tmp_path / "src", "m", "1", "llm", generate_key(), chunk_size=CHUNK
    )


async def test_stream_closed_by_server_while_idle_is_replaced(
    tmp_path: Path, nursery: trio.Nursery, mock_clock: trio.testing.MockClock
) -> None:
    store, manifest = seed(tmp_path)
    server = Server(nursery, BlobService(store, limits=BlobLimits(idle_timeout=5)))
    source = PeerChunkSource(server.open_stream, "peer", max_streams=1, reuse_idle=100)
    digest = manifest.files[0].sha256
    assert len(await source.fetch_chunk(digest, 0, CHUNK)) == CHUNK
    await trio.testing.wait_all_tasks_blocked()  # the server waits for the next request
    mock_clock.jump(6)  # the server ends the idle stream; the source still deems it fresh
    await trio.testing.wait_all_tasks_blocked()
    assert server.live == 0
    assert len(await source.fetch_chunk(digest, 1, CHUNK)) == CHUNK
    assert source.opened == 2
    assert len(await source.fetch_chunk(digest, 2, CHUNK)) == CHUNK  # and now reused
    assert source.opened == 2


async def test_stale_idle_stream_is_not_reused(
    tmp_path: Path, nursery: trio.Nursery, mock_clock: trio.testing.MockClock
) -> None:
    store, manifest = seed(tmp_path)
    server = Server(nursery, BlobService(store))
    source = PeerChunkSource(server.open_stream, "peer", max_streams=1, reuse_idle=10)
    digest = manifest.files[0].sha256
    await source.fetch_chunk(digest, 0, CHUNK)
    mock_clock.jump(5)
    await source.fetch_chunk(digest, 1, CHUNK)
    assert source.opened == 1
    mock_clock.jump(11)
    await source.fetch_chunk(digest, 2, CHUNK)
    assert source.opened == 2
    await trio.testing.wait_all_tasks_blocked()
    assert server.live == 1  # the stale stream was reset, so its server side ended
    await source.aclose()
