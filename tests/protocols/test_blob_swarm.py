"""Peer-to-peer pulls over real libp2p nodes (simnet.Swarm on 127.0.0.1)."""

from __future__ import annotations

import os
import shutil
from functools import partial
from pathlib import Path

import trio

from p2pedge.ids import ModelId
from p2pedge.models.keys import TrustStore, generate_key, public_key_hex
from p2pedge.models.pull import pull
from p2pedge.models.store import Store
from p2pedge.protocols.blob.codec import (
    PROTOCOL_ID,
    ChunkRequest,
    DataResponse,
    Request,
    Response,
)
from p2pedge.protocols.blob.handler import (
    BlobService,
    PeerChunkSource,
    announce_store,
    swarm_sources,
)
from p2pedge.registry.client import RegistryClient
from p2pedge.registry.server import serve_registry
from simnet import Swarm

CHUNK = 16 * 1024
MODEL = ModelId("tiny", "1")


class TamperingBlobService(BlobService):
    """Fault injector: a peer that flips one byte of every chunk it serves."""

    async def _answer(self, request: Request) -> Response:
        response = await super()._answer(request)
        if isinstance(request, ChunkRequest) and isinstance(response, DataResponse):
            return DataResponse(bytes([response.data[0] ^ 0xFF]) + response.data[1:])
        return response


def seed(tmp_path: Path) -> tuple[Path, TrustStore]:
    source = tmp_path / "src"
    source.mkdir()
    (source / "model.onnx.data").write_bytes(os.urandom(30 * CHUNK + 7))
    (source / "genai_config.json").write_bytes(b'{"model": {}}')
    key = generate_key()
    Store(tmp_path / "seed").add_model_dir(source, "tiny", "1", "llm", key, chunk_size=CHUNK)
    return tmp_path / "seed", TrustStore([public_key_hex(key)])


async def test_pull_from_three_peers_with_registry_stopped(tmp_path: Path) -> None:
    seed_root, trust = seed(tmp_path)
    async with trio.open_nursery() as outer:
        scope = trio.CancelScope()

        async def run_registry(task_status: trio.TaskStatus[int]) -> None:
            with scope:
                await serve_registry(seed_root, task_status=task_status)

        port = await outer.start(run_registry)
        async with RegistryClient(f"http://127.0.0.1:{port}") as registry:
            assert [m["name"] for m in await registry.list_models()] == ["tiny"]
            scope.cancel()
        async with Swarm(4, seed=1) as swarm:
            holders = swarm.nodes[:3]
            services = []
            for index, node in enumerate(holders):
                root = tmp_path / f"peer{index}"
                shutil.copytree(seed_root, root)
                service = BlobService(Store(root))
                services.append(service)
                node.set_stream_handler(PROTOCOL_ID, service.handle)
                assert await announce_store(node.peers, service.store) == 3
            puller = swarm.nodes[3]
            found = await swarm_sources(puller.context, ModelId("tiny"))
            names = {f"peer {n.peer_id}" for n in holders}
            assert found and {s.name for s in found} <= names
            sources = [PeerChunkSource.for_node(puller, n.peer_id) for n in holders]
            store = Store(tmp_path / "client")
            async with RegistryClient(f"http://127.0.0.1:{port}", timeout=2) as dead:
                result = await pull(ModelId("tiny"), store, [dead, *sources], trust, progress=False)
            assert result.manifest.model == MODEL
            assert dead.name not in result.by_source
            assert all(result.by_source.get(s.name, 0) > 0 for s in sources)
            assert sum(s.served_chunks for s in services) == 32
            target = store.materialize(MODEL)
            data = (tmp_path / "src" / "model.onnx.data").read_bytes()
            assert (target / "model.onnx.data").read_bytes() == data


async def test_tampering_peer_dropped_pull_completes_from_others(tmp_path: Path) -> None:
    seed_root, trust = seed(tmp_path)
    async with Swarm(3, seed=2) as swarm:
        kinds = [TamperingBlobService, BlobService]
        for index, (node, kind) in enumerate(zip(swarm.nodes[:2], kinds, strict=True)):
            root = tmp_path / f"peer{index}"
            shutil.copytree(seed_root, root)
            node.set_stream_handler(PROTOCOL_ID, kind(Store(root)).handle)
        puller = swarm.nodes[2]
        evil, honest = (PeerChunkSource.for_node(puller, n.peer_id) for n in swarm.nodes[:2])
        store = Store(tmp_path / "client")
        result = await pull(MODEL, store, [evil, honest], trust, progress=False)
        assert "sha256 mismatch" in result.dropped[evil.name]
        assert result.by_source == {honest.name: 32}
        assert store.has_model(MODEL)
        await evil.aclose()
        await honest.aclose()


async def test_registry_and_peer_together(tmp_path: Path, nursery: trio.Nursery) -> None:
    seed_root, trust = seed(tmp_path)
    port = await nursery.start(partial(serve_registry, seed_root))
    async with Swarm(2, seed=3) as swarm:
        holder, puller = swarm.nodes
        holder.set_stream_handler(PROTOCOL_ID, BlobService(Store(seed_root)).handle)
        peer = PeerChunkSource.for_node(puller, holder.peer_id)
        async with RegistryClient(f"http://127.0.0.1:{port}") as registry:
            result = await pull(MODEL, Store(tmp_path / "c"), [registry, peer], trust)
        assert set(result.by_source) == {registry.name, peer.name}
        assert sum(result.by_source.values()) == 32
