"""SmolLM2 split over three in-process servers: greedy tokens equal the unsplit model's."""

from __future__ import annotations

import itertools
import shutil
from pathlib import Path

import numpy as np
import pytest
import trio

from p2pedge.ids import LayerRange
from p2pedge.protocols.pipeline.client import ClientConfig, ShardedSession
from p2pedge.protocols.pipeline.handler import PipelineServer
from p2pedge.protocols.pipeline.local import LocalSwarm
from p2pedge.protocols.pipeline.serving import ensure_shard_dir, model_layers
from p2pedge.runtime.config import RuntimeConfig
from p2pedge.runtime.shard_session import ShardModel
from p2pedge.testing import tiny as testing

PROMPT = [1, 9690, 198, 504, 3575, 282, 4649, 314, 2, 198, 1, 520, 9531, 198]


@pytest.mark.real_model
async def test_smollm2_three_shards_match_unsplit(tmp_path: Path) -> None:
    # A private copy: onnx refuses to read external data with several hard links, and
    # the model store hard-links its files (reported to the store/convert owners).
    model_dir = tmp_path / "smollm2"
    shutil.copytree(testing.real_model_dir(), model_dir)
    n_layers = model_layers(model_dir)
    runtime = RuntimeConfig(intra_op_threads=2)
    full = ShardModel(model_dir / "model.onnx", runtime).new_session(64)
    logits, expected = full.step(np.array([PROMPT], np.int64), 0), []
    for pos in range(len(PROMPT), len(PROMPT) + 8):
        expected.append(int(np.argmax(logits)))
        logits = full.step(np.array([[expected[-1]]], np.int64), pos)
    cuts = [0, n_layers // 3, 2 * n_layers // 3, n_layers]
    async with trio.open_nursery() as nursery:
        swarm = LocalSwarm(nursery)
        for a, b in itertools.pairwise(cuts):
            layers = LayerRange(a, b)
            shard_dir = await trio.to_thread.run_sync(
                ensure_shard_dir, model_dir, layers, tmp_path / "shards"
            )
            model = ShardModel.from_dir(shard_dir, runtime)
            swarm.add(f"s{a}", PipelineServer({("smollm2", layers): model}))
        session = ShardedSession(
            swarm.open_stream,
            swarm.options,
            "smollm2",
            n_layers,
            ClientConfig(max_length=64, push=False),
        )
        async with session:
            assert len(session.route) == 3
            assert await session.generate(PROMPT, 8) == expected
        nursery.cancel_scope.cancel()
