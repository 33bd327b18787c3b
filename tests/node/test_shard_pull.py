"""A shard server that does not hold the model fetches only its shard's files, verified,
from a peer that holds it (real libp2p nodes on 127.0.0.1, one process)."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from p2pedge.errors import ModelLoadError
from p2pedge.ids import LayerRange, ModelId
from p2pedge.models.convert.shards import shard_files
from p2pedge.models.keys import generate_key, public_key_hex
from p2pedge.node.config import NodeConfig, ServeSpec
from p2pedge.node.models import TOKENIZER_FILES
from p2pedge.node.node import Node
from p2pedge.protocols.blob.handler import announce_store
from p2pedge.testing.tiny import build_tiny_model

MODEL = ModelId("tiny", "1")
PROMPT = "a tiny prompt"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny", seed=5, n_layers=4)


async def test_shard_servers_pull_only_their_blocks_and_serve_them(
    model_dir: Path, tmp_path: Path, config: Callable[..., NodeConfig]
) -> None:
    key = generate_key()
    trusted = tmp_path / "publisher.pub"
    trusted.write_text(public_key_hex(key))
    async with Node(config("publisher")) as publisher:
        manifest = await publisher.publish(model_dir, str(MODEL), key)
        assert [m.id for m in publisher.models.cached_models()] == [str(MODEL)]
        boot = (publisher.addrs[0],)

        def server(name: str, span: str) -> NodeConfig:
            serve = (ServeSpec.parse(f"{MODEL}:{span}"),)
            return config(name, bootstrap=boot, trusted_publishers=(trusted,), serve=serve)

        async with Node(server("first", "0-2")) as first, Node(server("last", "2-4")) as last:
            for node, layers in ((first, LayerRange(0, 2)), (last, LayerRange(2, 4))):
                await node.announced()  # the card is signed afresh at each announce
                held = node.models.store.held_paths(MODEL)
                assert sorted(held) == shard_files(model_dir, layers)
                assert len(held) < len(manifest.files)
                # another block's file is not here, and nobody is told this node has the model
                assert f"model.onnx.block-00{4 - layers.end}.data" not in held
                assert node.models.cached_models() == []
                assert not node.models.has_local(MODEL.name)
                served = [(s.model, s.start, s.end) for s in node.card.layers_served]
                assert served == [(MODEL.name, layers.start, layers.end)]
            client_config = config("client", bootstrap=boot, trusted_publishers=(trusted,))
            async with Node(client_config) as client:
                await client.pull(str(MODEL), files=list(TOKENIZER_FILES))
                sharded = await client.complete(
                    MODEL.name, prompt=PROMPT, max_tokens=8, temperature=0, route="sharded"
                )
            local = await publisher.complete(
                MODEL.name, prompt=PROMPT, max_tokens=8, temperature=0, route="local"
            )
    assert list(sharded.route) == [f"{first.peer_id}:0-2", f"{last.peer_id}:2-4"]
    assert sharded.token_ids == local.token_ids and sharded.provider == "sharded"
    assert len(sharded.token_ids) == 8 == sharded.completion_tokens
    # one Completion type: the sharded run reports like the local one
    assert (sharded.finish_reason, sharded.prompt_tokens) == (
        local.finish_reason,
        local.prompt_tokens,
    )


async def test_a_shard_from_an_untrusted_publisher_is_refused(
    model_dir: Path, tmp_path: Path, config: Callable[..., NodeConfig]
) -> None:
    async with Node(config("publisher")) as publisher:
        store = publisher.models.store
        store.add_model_dir(model_dir, MODEL.name, MODEL.version, "llm", generate_key())
        await announce_store(publisher.peers, store)
        stranger = tmp_path / "stranger.pub"
        stranger.write_text(public_key_hex(generate_key()))
        settings = config(
            "server",
            bootstrap=(publisher.addrs[0],),
            trusted_publishers=(stranger,),
            serve=(ServeSpec.parse(f"{MODEL}:0-2"),),
        )
        with pytest.raises(ModelLoadError, match="cannot serve tiny@1"):
            async with Node(settings):
                pass
    assert not list((tmp_path / "server" / "store").glob("blobs/*"))


async def test_a_replica_pulls_its_shard_from_a_shard_server_once_the_publisher_dropped_it(
    model_dir: Path, tmp_path: Path, config: Callable[..., NodeConfig]
) -> None:
    key = generate_key()
    trusted = tmp_path / "publisher.pub"
    trusted.write_text(public_key_hex(key))
    serve = (ServeSpec.parse(f"{MODEL}:1-3"),)

    def server(name: str, boot: str) -> NodeConfig:
        return config(name, bootstrap=(boot,), trusted_publishers=(trusted,), serve=serve)

    async with Node(config("publisher")) as publisher:
        store = publisher.models.store
        store.add_model_dir(model_dir, MODEL.name, MODEL.version, "llm", key)
        await announce_store(publisher.peers, store)
        async with Node(server("first", publisher.addrs[0])) as first:
            store.remove_model(MODEL)
            assert store.gc() > 0 and not store.blob_digests()  # only `first` has the files now
            async with Node(server("replica", first.addrs[0])) as replica:
                await replica.announced()  # the card is signed afresh at each announce
                held = replica.models.store.held_paths(MODEL)
                assert sorted(held) == shard_files(model_dir, LayerRange(1, 3))
                assert [(s.start, s.end) for s in replica.card.layers_served] == [(1, 3)]


async def test_a_published_model_missing_a_blocks_file_is_a_clear_error(
    model_dir: Path, tmp_path: Path, config: Callable[..., NodeConfig]
) -> None:
    key = generate_key()
    trusted = tmp_path / "publisher.pub"
    trusted.write_text(public_key_hex(key))
    broken = tmp_path / "broken"
    shutil.copytree(model_dir, broken)
    (broken / "model.onnx.block-001.data").unlink()  # the graph still names it
    async with Node(config("publisher")) as publisher:
        await publisher.publish(broken, str(MODEL), key)
        settings = config(
            "server",
            bootstrap=(publisher.addrs[0],),
            trusted_publishers=(trusted,),
            serve=(ServeSpec.parse(f"{MODEL}:0-2"),),
        )
        with pytest.raises(ModelLoadError, match=r"not in manifest.*model\.onnx\.block-001\.data"):
            async with Node(settings):
                pass
