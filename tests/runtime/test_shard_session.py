"""ShardSession: explicit KV on plain onnxruntime; a chain of shards equals the decoder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from p2pedge.errors import LocalProtocolError, ModelLoadError, ShardFailed
from p2pedge.ids import LayerRange
from p2pedge.models.convert.onnx_graph import build_decoder, build_shard
from p2pedge.models.convert.shards import write_shard_dir
from p2pedge.runtime.config import RuntimeConfig
from p2pedge.runtime.shard_session import ShardModel
from p2pedge.testing.tiny import tiny_weights

CONFIG = RuntimeConfig(intra_op_threads=1)
SPLITS = [LayerRange(0, 1), LayerRange(1, 3), LayerRange(3, 4)]


@pytest.fixture(scope="module")
def models() -> tuple[ShardModel, list[ShardModel]]:
    w = tiny_weights(seed=2, n_layers=4)
    full = ShardModel(build_decoder(w).SerializeToString(), CONFIG)
    parts = [ShardModel(build_shard(w, r).SerializeToString(), CONFIG) for r in SPLITS]
    return full, parts


def test_roles_and_kv_size_read_from_graphs(models: tuple[ShardModel, list[ShardModel]]) -> None:
    full, (first, middle, last) = models
    assert (first.info.first, first.info.last, first.info.blocks) == (True, False, (0,))
    assert (middle.info.first, middle.info.last, middle.info.blocks) == (False, False, (1, 2))
    assert (last.info.first, last.info.last) == (False, True)
    assert first.info.vocab == last.info.vocab == full.info.vocab
    # 2 blocks * 2 kv heads * 16 head dim * (key, value) * 4 bytes
    assert middle.info.kv_bytes_per_token == 2 * 2 * 16 * 2 * 4
    assert middle.info.kv_bytes(100) == 100 * 512


def test_chain_equals_decoder_with_rewind(models: tuple[ShardModel, list[ShardModel]]) -> None:
    full, parts = models
    prompt = np.array([[3, 14, 15, 92, 65, 35]], np.int64)
    ref = full.new_session(32)
    chain = [p.new_session(32) for p in parts]

    def run_chain(x: np.ndarray, start: int) -> np.ndarray:
        for s in chain:
            x = s.step(x, start)
        return x

    want = ref.step(prompt, 0)
    got = run_chain(prompt[:, :4], 0)
    got = run_chain(prompt[:, 4:], 4)  # chunked prefill
    np.testing.assert_allclose(got, want, atol=1e-4)
    nxt = np.array([[int(np.argmax(want))]], np.int64)
    want2 = ref.step(nxt, 6)
    np.testing.assert_allclose(run_chain(nxt, 6), want2, atol=1e-4)
    # A resent step rewinds to its start: same answer, same cache length.
    np.testing.assert_allclose(run_chain(nxt, 6), want2, atol=1e-4)
    assert all(s.length == 7 for s in chain)
    chain[0].reset()
    assert chain[0].length == 0


def test_limits(models: tuple[ShardModel, list[ShardModel]]) -> None:
    first = models[1][0].new_session(4)
    with pytest.raises(LocalProtocolError):
        first.step(np.zeros((1, 5), np.int64), 0)
    with pytest.raises(LocalProtocolError):
        first.rewind(1)
    with pytest.raises(LocalProtocolError):
        models[1][0].new_session(0)


def test_from_dir(tmp_path: Path) -> None:
    w = tiny_weights(seed=2, n_layers=4)
    out = write_shard_dir(w, LayerRange(1, 3), tmp_path / "1-3", "lossless4")
    model = ShardModel.from_dir(out, CONFIG)
    assert model.info.blocks == (1, 2) and model.n_layers == 4
    with pytest.raises(ModelLoadError):
        ShardModel.from_dir(tmp_path / "missing", CONFIG)


def test_in_place_kv_matches_plain_run(models: tuple[ShardModel, list[ShardModel]]) -> None:
    """GQA shards on CPU append KV in place; outputs equal the plain copy-per-step path
    exactly, through chunked prefill, decode, a resent step and a rewind to replay."""
    full, parts = models
    assert full.shares_kv and all(p.shares_kv for p in parts)
    w = tiny_weights(seed=2, n_layers=4)
    plain_model = ShardModel(build_decoder(w).SerializeToString(), CONFIG)
    plain_model.shares_kv = False
    shared, plain = full.new_session(16), plain_model.new_session(16)
    steps = [([3, 14, 15], 0), ([92, 65], 3), ([35], 5), ([35], 5), ([7], 6), ([8, 9], 2), ([1], 4)]
    for ids, start in steps:
        x = np.array([ids], np.int64)
        np.testing.assert_array_equal(shared.step(x, start), plain.step(x, start))
        assert shared.length == plain.length == start + len(ids)


def test_decode_buffers_match_plain_run_for_every_role() -> None:
    """Decode steps run through buffers bound once; around multi-position steps (which
    rebind) and rewinds, every role's outputs equal the plain path's exactly."""
    w = tiny_weights(seed=2, n_layers=4)
    steps = [(3, 0), (1, 3), (1, 4), (1, 4), (2, 5), (1, 7), (1, 2), (1, 3)]
    rng = np.random.default_rng(5)
    for layers in SPLITS:
        graph = build_shard(w, layers).SerializeToString()
        shared_model, plain_model = ShardModel(graph, CONFIG), ShardModel(graph, CONFIG)
        plain_model.shares_kv = False
        shared, plain = shared_model.new_session(16), plain_model.new_session(16)
        info = shared_model.info
        for n, start in steps:
            if info.first:
                x = rng.integers(0, info.vocab or 1, (1, n), dtype=np.int64)
            else:
                x = rng.standard_normal((1, n, info.hidden)).astype(np.float16)
            got = shared.step(x, start, last_only=n == 1)
            np.testing.assert_array_equal(got, plain.step(x, start, last_only=n == 1))
            assert shared.length == plain.length == start + n
        if not info.first:  # a hidden state of the wrong width is the engine's error, as before
            with pytest.raises(ShardFailed):
                shared.step(np.zeros((1, 1, info.hidden + 1), np.float32), shared.length)


def test_spelled_out_attention_keeps_the_plain_path() -> None:
    w = tiny_weights(seed=2, n_layers=2)
    model = ShardModel(build_decoder(w, attention="ops").SerializeToString(), CONFIG)
    assert not model.shares_kv
    session = model.new_session(8)
    session.step(np.array([[1, 2, 3]], np.int64), 0)
    assert session.length == 3
