"""ONNX decoder graphs agree with the numpy reference (prefill, decode, padding, variants)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from p2pedge.models.convert.layout import read_model_facts, save_onnx, write_model_dir
from p2pedge.models.convert.onnx_graph import Attention, Variant, build_decoder
from p2pedge.models.convert.tables import q8_0_blocks
from p2pedge.models.convert.weights import LlamaConfig, LlamaWeights
from p2pedge.runtime.reference import ReferenceLlama
from p2pedge.testing import (
    build_tiny_model,
    random_llama_weights,
    tiny_tokenizer_spec,
    tiny_weights,
)
from p2pedge.testing.tiny import OrtStepper

TOL = 1e-4
PROMPT = [1, 120, 118, 264, 13, 75, 351, 111, 2, 13, 1, 99, 13]


@pytest.fixture(scope="module")
def weights() -> LlamaWeights:
    return tiny_weights(seed=0)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory, weights: LlamaWeights) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("graph")
    dirs = {v: build_tiny_model(root / v, seed=0, variant=v) for v in ("fp32", "lossless4")}
    for v in ("fp32", "lossless4"):
        dirs[f"{v}-ops"] = _write(root / f"{v}-ops", weights, v, attention="ops").parent
    dirs["lossless4-limbs"] = write_model_dir(
        root / "lossless4-limbs", weights, tiny_tokenizer_spec(), "lossless4", int8_limbs=True
    )
    return dirs


def _write(
    tmp_path: Path,
    w: LlamaWeights,
    variant: Variant,
    int8: bool = False,
    attention: Attention = "gqa",
    limbs: bool = False,
) -> Path:
    return save_onnx(build_decoder(w, variant, int8, attention, limbs), tmp_path)


def _compare_greedy(stepper: OrtStepper, ref: ReferenceLlama, steps: int, tol: float) -> None:
    cache = ref.new_cache()
    ids = np.array([PROMPT], dtype=np.int64)
    total = 0
    for _ in range(steps):
        seq = ids.shape[1]
        pos = np.arange(total, total + seq, dtype=np.int64)[None]
        mask = np.ones((1, total + seq), dtype=np.int64)
        got = stepper.step(ids, pos, mask)
        want = ref.forward(ids, pos, cache)
        assert got.shape == want.shape
        assert np.abs(got - want).max() <= tol
        total += seq
        ids = np.array([[int(np.argmax(want[0, -1]))]], dtype=np.int64)


ALL = ["fp32", "lossless4", "fp32-ops", "lossless4-ops", "lossless4-limbs"]


@pytest.mark.parametrize("variant", ALL)
def test_prefill_and_decode_match_reference(
    variant: str, weights: LlamaWeights, model_dirs: dict[str, Path]
) -> None:
    stepper = OrtStepper(model_dirs[variant] / "model.onnx")
    _compare_greedy(stepper, ReferenceLlama(weights), steps=6, tol=TOL)


@pytest.mark.parametrize("variant", ALL)
def test_chunked_prefill_matches_reference(
    variant: str, weights: LlamaWeights, model_dirs: dict[str, Path]
) -> None:
    """Several tokens on top of a non-empty cache exercise the causal offset."""
    stepper = OrtStepper(model_dirs[variant] / "model.onnx")
    ref = ReferenceLlama(weights)
    cache = ref.new_cache()
    total = 0
    for chunk in (PROMPT[:5], PROMPT[5:9], PROMPT[9:]):
        ids = np.array([chunk], dtype=np.int64)
        pos = np.arange(total, total + len(chunk), dtype=np.int64)[None]
        mask = np.ones((1, total + len(chunk)), dtype=np.int64)
        got = stepper.step(ids, pos, mask)
        assert np.abs(got - ref.forward(ids, pos, cache)).max() <= TOL
        total += len(chunk)
    whole = ReferenceLlama(weights)
    full = whole.forward(
        np.array([PROMPT], dtype=np.int64), np.arange(len(PROMPT))[None], whole.new_cache()
    )
    assert np.abs(got[0, -1] - full[0, -1]).max() <= TOL


@pytest.mark.parametrize("variant", ["fp32", "fp32-ops", "lossless4-limbs"])
def test_left_padded_batch_matches_unpadded_rows(
    variant: str, weights: LlamaWeights, model_dirs: dict[str, Path]
) -> None:
    short = PROMPT[:7]
    pad = len(PROMPT) - len(short)
    ids = np.array([PROMPT, [2] * pad + short], dtype=np.int64)
    mask = np.array([[1] * len(PROMPT), [0] * pad + [1] * len(short)], dtype=np.int64)
    pos = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
    stepper = OrtStepper(model_dirs[variant] / "model.onnx")
    stepper.reset(batch=2)
    got = stepper.step(ids, pos, mask)
    ref = ReferenceLlama(weights)
    for row, tokens in ((0, PROMPT), (1, short)):
        want = ref.forward(
            np.array([tokens], dtype=np.int64), np.arange(len(tokens))[None], ref.new_cache()
        )
        assert np.abs(got[row, -len(tokens) :] - want[0]).max() <= TOL
    # One decode step with the padded cache.
    nxt = np.argmax(got[:, -1], axis=-1)[:, None].astype(np.int64)
    mask2 = np.concatenate([mask, np.ones((2, 1), dtype=np.int64)], axis=1)
    step = stepper.step(nxt, pos[:, -1:] + 1, mask2)
    cache = ref.new_cache()
    ref.forward(np.array([short], dtype=np.int64), np.arange(len(short))[None], cache)
    want = ref.forward(nxt[1:], np.array([[len(short)]]), cache)
    assert np.abs(step[1] - want[0]).max() <= TOL


def _accuracy_levels(model: onnx.ModelProto) -> set[int]:
    return {
        a.i
        for n in model.graph.node
        if n.op_type == "MatMulNBits"
        for a in n.attribute
        if a.name == "accuracy_level"
    }


def test_int8_activations_stays_close(weights: LlamaWeights, tmp_path: Path) -> None:
    path = _write(tmp_path, weights, "lossless4", int8=True)
    model = onnx.load(str(path), load_external_data=False)
    levels = _accuracy_levels(model)
    assert levels == {4}
    # int8 activations are an approximation (about 1% per matmul on this random model, which
    # its sharp attention amplifies): only close agreement in aggregate is promised.
    ids = np.array([PROMPT], dtype=np.int64)
    pos = np.arange(len(PROMPT))[None]
    got = OrtStepper(path).step(ids, pos, np.ones_like(ids))
    ref = ReferenceLlama(weights)
    want = ref.forward(ids, pos, ref.new_cache())
    assert np.corrcoef(got.ravel(), want.ravel())[0, 1] > 0.97


def _nbits(path: Path) -> tuple[list[int], list[str]]:
    model = onnx.load(str(path), load_external_data=False)
    bits = sorted(
        next(a.i for a in n.attribute if a.name == "bits")
        for n in model.graph.node
        if n.op_type == "MatMulNBits"
    )
    return bits, [t.name for t in model.graph.initializer]


def test_lossless4_maps_every_block_matrix_to_matmulnbits(
    weights: LlamaWeights, model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    n_layers = weights.config.n_layers
    # qkv, o, gate_up, down per block in 4 bits; at accuracy 0 the Q8_0 embedding is
    # gathered as 8-bit blocks and the head runs as its two 4-bit halves ...
    bits, names = _nbits(model_dirs["lossless4"] / "model.onnx")
    assert bits == [4] * (4 * n_layers) + [4, 4]
    assert not any(n.endswith(".weight_t") for n in names)
    assert "model.embed_tokens.weight" not in names
    assert "model.embed_tokens.q8_weight" in names
    assert "model.embed_tokens.head_hi_qweight" in names
    # ... and with int8 activations the Q8_0 embedding doubles as an exact 8-bit head.
    bits, names = _nbits(_write(tmp_path, weights, "lossless4", int8=True))
    assert bits == [4] * (4 * n_layers) + [8]
    assert "model.embed_tokens.weight" not in names
    assert "model.embed_tokens.q8_weight" in names
    # Limbs: fp32-exact activations, yet every matmul (head included) on the int8 path.
    path = model_dirs["lossless4-limbs"] / "model.onnx"
    bits, names = _nbits(path)
    assert bits == [4] * (4 * n_layers) + [8]
    assert "model.embed_tokens.q8_weight" in names
    model = onnx.load(str(path), load_external_data=False)
    levels = _accuracy_levels(model)
    assert levels == {4}
    assert read_model_facts(path.parent).int8_limbs


def test_int8_limbs_refuse_other_modes(weights: LlamaWeights) -> None:
    with pytest.raises(ValueError, match="limbs"):
        build_decoder(weights, "lossless4", True, "gqa", True)
    with pytest.raises(ValueError, match="limbs"):
        build_decoder(weights, "fp32", False, "gqa", True)


def test_genai_shares_the_kv_buffer_only_with_gqa(
    weights: LlamaWeights, model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    def shared(model_dir: Path) -> bool:
        config = json.loads((model_dir / "genai_config.json").read_text())
        return bool(config["search"]["past_present_share_buffer"])

    assert shared(model_dirs["lossless4"]) and shared(model_dirs["lossless4-limbs"])
    ops = write_model_dir(tmp_path, weights, tiny_tokenizer_spec(), "fp32", attention="ops")
    assert not shared(ops)  # concatenating attention cannot write into a shared buffer


def test_q8_0_recovery_is_exact_or_refused() -> None:
    table = tiny_weights(seed=0, n_layers=1).token_embd
    blocks = q8_0_blocks(table)
    assert blocks is not None
    u, d = blocks
    back = ((u.astype(np.float32) - 128) * d[..., None]).reshape(table.shape)
    assert np.array_equal(back, table)
    noisy = table.copy()
    noisy[0, 0] += np.float32(1e-3)
    assert q8_0_blocks(noisy) is None


@pytest.mark.parametrize(
    ("n_heads", "n_kv_heads", "head_dim"), [(4, 4, 24), (6, 2, 32), (4, 1, 16)]
)
@pytest.mark.parametrize("variant", ["fp32", "lossless4"])
@pytest.mark.parametrize("attention", ["gqa", "ops"])
def test_other_shapes_and_untied_head(
    n_heads: int,
    n_kv_heads: int,
    head_dim: int,
    variant: Variant,
    attention: Attention,
    tmp_path: Path,
) -> None:
    """Non-power-of-two softmax scale, MHA and MQA, and an untied LM head."""
    cfg = LlamaConfig(2, 64, n_heads, n_kv_heads, head_dim, 96, 400, 5000.0, 1e-6, 64)
    w = random_llama_weights(cfg, seed=7, quantize_q4_1=variant == "lossless4")
    rng = np.random.default_rng(1)
    w = dataclasses.replace(w, lm_head=(0.3 * rng.standard_normal((400, 64))).astype(np.float32))
    path = _write(tmp_path, w, variant, attention=attention)
    _compare_greedy(OrtStepper(path), ReferenceLlama(w), 4, TOL)


def test_tiny_model_is_deterministic(tmp_path: Path) -> None:
    a = build_tiny_model(tmp_path / "a", seed=3, variant="lossless4", n_layers=2)
    b = build_tiny_model(tmp_path / "b", seed=3, variant="lossless4", n_layers=2)
    c = build_tiny_model(tmp_path / "c", seed=4, variant="lossless4", n_layers=2)
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    block = "model.onnx.block-000.data"
    assert (a / block).read_bytes() != (c / block).read_bytes()


@pytest.mark.parametrize("variant", ["fp32", "lossless4", "lossless4-limbs"])
def test_genai_greedy_matches_reference(
    variant: str, weights: LlamaWeights, model_dirs: dict[str, Path]
) -> None:
    import onnxruntime_genai as og

    model = og.Model(str(model_dirs[variant]))
    params = og.GeneratorParams(model)
    n_new = 12
    params.set_search_options(max_length=len(PROMPT) + n_new, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(np.array(PROMPT, dtype=np.int32))
    out: list[int] = []
    while not gen.is_done():
        gen.generate_next_token()
        out.append(int(gen.get_next_tokens()[0]))
    want = ReferenceLlama(weights).greedy(PROMPT, n_new)
    eos = read_model_facts(model_dirs[variant]).eos_token_id
    if eos in want:
        want = want[: want.index(eos) + 1]
    assert out == want
    assert len(set(out)) > 3  # the tiny model does not degenerate into one token
