"""Loaded shard models of a tiny random model, for pipeline tests and benchmarks."""

from __future__ import annotations

from typing import Any

from p2pedge.ids import LayerRange
from p2pedge.models.convert.onnx_graph import build_decoder, build_shard
from p2pedge.runtime.config import RuntimeConfig
from p2pedge.runtime.shard_session import ShardModel
from p2pedge.testing.tiny import tiny_weights


def tiny_shards(
    ranges: list[tuple[int, int]], *, n_layers: int, seed: int = 0
) -> tuple[dict[LayerRange, Any], bytes]:
    """Loaded shard models of a tiny random model, and the unsplit decoder's bytes.

    For tests and benchmarks: graphs are built in memory (no files) with the graph
    engineer's builder, the same one real imports use. One model per range, so several
    servers of the same range share weights as they would share a disk.
    """
    weights = tiny_weights(seed=seed, n_layers=n_layers)
    config = RuntimeConfig(intra_op_threads=1)
    shards = {
        LayerRange(a, b): ShardModel(
            build_shard(weights, LayerRange(a, b)).SerializeToString(), config
        )
        for a, b in sorted(set(ranges))
    }
    return shards, build_decoder(weights).SerializeToString()
