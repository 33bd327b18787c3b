"""Real nodes pull model bytes over each other's direct lanes, fall back to libp2p streams
when a lane cannot carry them, and count the bytes on both sides in ``/metrics``."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
import trio

from p2pedge.api import ApiApp, serve_api
from p2pedge.ids import ModelId
from p2pedge.models.keys import generate_key, public_key_hex
from p2pedge.models.manifest import Manifest
from p2pedge.node.api import api_for
from p2pedge.node.config import NodeConfig
from p2pedge.node.node import Node
from p2pedge.protocols._stream import FramedStream
from p2pedge.protocols.blob.codec import PROTOCOL_ID
from p2pedge.protocols.direct.handler import SealedStream
from p2pedge.testing.tiny import build_tiny_model

Config = Callable[..., NodeConfig]
MODEL = ModelId("tiny", "1")
ECHO = "/test/echo/1.0.0"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("lanes") / "tiny", seed=11, n_layers=2)


@asynccontextmanager
async def holder_and_puller(
    tiny: Path, tmp_path: Path, config: Config, **holder: object
) -> AsyncIterator[tuple[Node, Node, Manifest]]:
    key = generate_key()
    trusted = tmp_path / "publisher.pub"
    trusted.write_text(public_key_hex(key))
    async with Node(config("holder", **holder)) as first:
        manifest = await first.publish(tiny, str(MODEL), key)
        boot = (first.addrs[0],)
        puller_config = config("puller", bootstrap=boot, trusted_publishers=(trusted,))
        async with Node(puller_config) as second:
            yield first, second, manifest


async def counters(port: int) -> tuple[float, float]:
    """(bytes served, bytes pulled) as a Prometheus scrape of the node's API sees them."""
    async with httpx.AsyncClient() as http:
        text = (await http.get(f"http://127.0.0.1:{port}/metrics")).text
    samples = dict(line.rsplit(" ", 1) for line in text.splitlines() if line[:1] != "#")
    return float(samples["p2pedge_bytes_served_total"]), float(
        samples["p2pedge_bytes_pulled_total"]
    )


async def test_a_node_pulls_over_the_lane_and_metrics_count_both_sides(
    tiny: Path, tmp_path: Path, config: Config
) -> None:
    async with (
        holder_and_puller(tiny, tmp_path, config) as (holder, puller, manifest),
        trio.open_nursery() as nursery,
    ):
        assert holder.lanes.server is None  # no lane port is opened until a peer pulls
        ports = [await nursery.start(serve_api, ApiApp(api_for(n))) for n in (holder, puller)]
        before = [await counters(port) for port in ports]
        await puller.pull(str(MODEL))
        after = [await counters(port) for port in ports]
        nursery.cancel_scope.cancel()
    data = sum(f.size for f in manifest.files)
    assert before == [(0.0, 0.0), (0.0, 0.0)]
    # the holder wrote every file's bytes and the manifest; the puller committed the files
    assert after == [(data + len(manifest.to_bytes()), 0.0), (0.0, data)]
    assert puller.models.has_local(MODEL.name)
    assert puller.lanes.opened >= 1 and puller.lanes.fallbacks == 0
    assert holder.lanes.server is not None
    assert holder.lanes.server.accepted == puller.lanes.opened


async def test_a_peer_without_a_lane_is_pulled_from_over_libp2p(
    tiny: Path, tmp_path: Path, config: Config
) -> None:
    async with holder_and_puller(tiny, tmp_path, config, direct_lane=None) as nodes:
        holder, puller, manifest = nodes
        await puller.pull(str(MODEL))
    assert puller.models.has_local(MODEL.name)
    assert holder.models.blobs is not None
    data = sum(f.size for f in manifest.files)
    assert holder.models.blobs.served_bytes == data + len(manifest.to_bytes())
    assert puller.models.distribution.pulled_bytes == data
    assert (puller.lanes.opened, puller.lanes.fallbacks) == (0, 1)  # the miss is remembered


async def echo(stream: FramedStream, peer_id: str) -> None:
    await stream.send_bytes(await stream.receive_bytes())


async def test_a_lane_without_blobs_falls_back_for_blobs_only(
    tiny: Path, tmp_path: Path, config: Config
) -> None:
    """An older peer serves the pipeline on its lane but not blobs: the blob streams fall
    back to libp2p, and the miss does not keep the other protocol off the lane."""
    async with holder_and_puller(tiny, tmp_path, config) as (holder, puller, _):
        holder.set_stream_handler(ECHO, echo)
        await holder.lanes.serve(ECHO, echo)
        assert holder.lanes.server is not None
        holder.lanes.server.handlers.pop(PROTOCOL_ID, None)  # the fault: no blobs there
        await puller.pull(str(MODEL))
        assert puller.models.has_local(MODEL.name)
        assert (puller.lanes.opened, puller.lanes.fallbacks) == (0, 1)
        stream = await puller.lanes.open(holder.peer_id, ECHO, timeout=5)
        assert isinstance(stream, SealedStream)
        await stream.send_bytes(b"still on the lane")
        assert await stream.receive_bytes(timeout=5) == b"still on the lane"
        await stream.close()


async def test_a_lane_port_that_is_taken_leaves_pulls_on_libp2p(
    tiny: Path, tmp_path: Path, config: Config
) -> None:
    """The holder's configured lane port is taken: it still starts and serves; the first
    ticket request finds no listener, and the puller falls back once."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        async with holder_and_puller(tiny, tmp_path, config, direct_lane=port) as nodes:
            holder, puller, _ = nodes
            await puller.pull(str(MODEL))
            assert puller.models.has_local(MODEL.name)
            assert holder.lanes.server is None
            assert (puller.lanes.opened, puller.lanes.fallbacks) == (0, 1)
