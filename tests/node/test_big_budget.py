"""Nodes whose memory budgets are each below the model's size serve it together.

Real libp2p nodes on 127.0.0.1 place their blocks from the budget alone (no ranges given),
announce them, and a client's greedy tokens over the route equal the whole model's; a node
whose budget cannot hold one block refuses with the numbers, and the KV bytes a budgeted
server hands out are what its weights leave.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from p2pedge.errors import Busy, ConfigError, MemoryBudgetError
from p2pedge.ids import LayerRange
from p2pedge.node.config import NodeConfig, ServeSpec
from p2pedge.node.node import Node
from p2pedge.planning.routes import NoRoute
from p2pedge.protocols.pipeline.client import ClientConfig
from p2pedge.protocols.pipeline.serving import (
    dir_bytes,
    ensure_shard_dir,
    model_bytes,
    open_sharded_session,
    start_pipeline_server,
)
from p2pedge.runtime.config import RuntimeConfig
from p2pedge.runtime.shard_session import ShardModel
from p2pedge.testing.tiny import build_tiny_model
from simnet.swarm import Swarm

PROMPT = [5, 17, 42, 99, 100, 101, 7, 8, 9, 250]
MODEL = "tiny"
# The tiny model's shards are ~0.3-0.4 MB and a block's KV reservation (one 256-token
# session) 64 KiB: 0.6 MB holds two blocks at each end and two in the middle.
BUDGET = 600_000
RUNTIME = RuntimeConfig(intra_op_threads=1)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / MODEL, seed=7, n_layers=6)


def whole_model_tokens(model_dir: Path, n: int) -> list[int]:
    full = ShardModel(model_dir / "model.onnx", RUNTIME).new_session(64)
    logits, pos = full.step(np.array([PROMPT], np.int64), 0), len(PROMPT)
    out: list[int] = []
    while len(out) < n:
        out.append(int(np.argmax(logits)))
        logits = full.step(np.array([[out[-1]]], np.int64), pos)
        pos += 1
    return out


async def test_three_budgets_below_the_model_serve_it_together(
    model_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    assert BUDGET < model_bytes(model_dir).total
    expected = whole_model_tokens(model_dir, 8)
    async with Swarm(4, seed=3, measure_compute=False) as swarm:
        client, *servers = swarm.nodes
        placed, pipeline = [], []
        for i, node in enumerate(servers):
            server = await start_pipeline_server(
                node.models.ctx,  # what the node's own shard server is given
                [(MODEL, model_dir, None)],
                shards_root=tmp_path / str(i),
                runtime=RUNTIME,
                memory_budget=BUDGET,
            )
            await node.announce()
            ((_, layers),) = server.shards
            placed.append(layers)
            pipeline.append(server)
            # what the weights leave of the budget is the KV budget
            (shard_dir,) = (tmp_path / str(i)).glob(f"*/{layers}")
            assert dir_bytes(shard_dir) + server.budget.limit == BUDGET
        assert placed == [LayerRange(0, 2), LayerRange(2, 4), LayerRange(4, 6)]

        config = ClientConfig(max_length=64, chunk=4, step_timeout=10)
        session = await open_sharded_session(client.models.ctx, MODEL, config=config)
        async with session:
            assert [h.layers for h in session.route] == placed
            tokens = [int(np.argmax(await session.extend(PROMPT)))]
            while len(tokens) < len(expected):
                tokens.append(int(np.argmax(await session.extend([tokens[-1]]))))
            assert tokens == expected
            # a 64-token session's KV (2 blocks x 64 positions x 512 B) is charged against
            # what the weights left; a 256-token one more than one peer's share of it
            head = pipeline[0]
            assert head.budget.used == 64 * 2 * 256
            big = ClientConfig(max_length=256, chunk=4, step_timeout=10)
            # every hop refuses (Busy, "budget"): the client runs out of routes
            with caplog.at_level(logging.WARNING), pytest.raises((NoRoute, Busy)) as refused:
                await open_sharded_session(client.models.ctx, MODEL, config=big)
            assert "pipeline.kv_bytes: peer limit" in caplog.text + str(refused.value)
            assert head.budget.used == 64 * 2 * 256  # the refused session holds nothing


def test_the_estimate_placement_uses_bounds_every_built_shard(
    model_dir: Path, tmp_path: Path
) -> None:
    """Placement decides from the graph's byte counts, the server checks the built files:
    an estimate below them would place a window the server then refuses."""
    sizes = model_bytes(model_dir)
    for layers in (LayerRange(0, 1), LayerRange(2, 4), LayerRange(5, 6), LayerRange(0, 6)):
        built = dir_bytes(ensure_shard_dir(model_dir, layers, tmp_path))
        assert built <= sizes.shard(layers) <= built * 1.2, layers


async def test_a_budget_below_one_block_is_a_clear_error(model_dir: Path, tmp_path: Path) -> None:
    async with Swarm(1, seed=4, measure_compute=False) as swarm:
        (node,) = swarm.nodes
        with pytest.raises(MemoryBudgetError) as caught:
            await start_pipeline_server(
                node.models.ctx,
                [(MODEL, model_dir, None)],
                shards_root=tmp_path,
                runtime=RUNTIME,
                memory_budget=200_000,
            )
        assert isinstance(caught.value, ConfigError)
        assert "memory budget 200000 B cannot hold blocks" in str(caught.value)
        assert "KV reservation" in str(caught.value)
        assert not node.card.layers_served
        # an explicit range beyond the budget is refused before anything is built
        with pytest.raises(MemoryBudgetError, match="blocks 0-6"):
            await start_pipeline_server(
                node.models.ctx,
                [(MODEL, model_dir, LayerRange(0, 6))],
                shards_root=tmp_path,
                runtime=RUNTIME,
                memory_budget=BUDGET,
            )
        assert not list(tmp_path.iterdir())


async def test_the_node_config_budget_places_and_bounds_its_shards(
    model_dir: Path, config: Callable[..., NodeConfig]
) -> None:
    """``NodeConfig.memory_budget`` reaches placement and the shard server: a lone node
    with no range given takes the blocks that fit, and one below a block will not start."""
    serve = (ServeSpec(MODEL),)
    dirs = ((MODEL, model_dir),)
    async with Node(config("fits", model_dirs=dirs, serve=serve, memory_budget=BUDGET)) as node:
        (served,) = node.card.layers_served
        assert (served.start, served.end) == (0, 2)  # the window that starts a route and fits
        assert node.models.pipeline is not None
        assert node.models.pipeline.budget.limit < BUDGET  # the weights took their share
    with pytest.raises(MemoryBudgetError, match="memory budget 200000 B"):
        async with Node(config("small", model_dirs=dirs, serve=serve, memory_budget=200_000)):
            pass
