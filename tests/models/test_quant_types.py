"""Every GGUF tensor type maps onto onnxruntime kernels without rounding a weight, or the
import fails up front naming the tensor; each import shards like the whole model.

Synthetic random-weight GGUF files (``p2pedge.testing.synthetic_gguf``) stand in for real
ones: random valid blocks of each type, decoded here and compared bit for bit with the
``gguf`` package's own dequantisation.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime as ort
import pytest

from p2pedge.ids import LayerRange
from p2pedge.models import cli_import
from p2pedge.models.convert import quants
from p2pedge.models.convert.gguf_reader import GGUFFormatError, read_gguf
from p2pedge.models.convert.importer import import_gguf
from p2pedge.models.convert.layout import read_model_facts
from p2pedge.models.convert.onnx_graph import build_decoder
from p2pedge.models.convert.shards import load_model_weights, split_model_dir, write_shard_dir
from p2pedge.models.convert.weights import LlamaWeights, Q4_1Matrix, QuantMatrix
from p2pedge.runtime.reference import ReferenceLlama
from p2pedge.runtime.shard_session import gather_table_rows
from p2pedge.testing.synthetic_gguf import (
    QTYPES,
    SyntheticSpec,
    random_blocks,
    write_synthetic_gguf,
)
from p2pedge.testing.tiny import OrtStepper

PROMPT = [5, 17, 33, 80, 2, 9, 100, 44]
LOGIT_RTOL = 1e-4  # of the largest |logit|: fp32 kernels re-associate sums (measured <4e-6)
ALL_TYPES = (*QTYPES, "F16", "BF16", "F32")
# (kept as, bits, block) per type; dense types stay float32.
KEPT = {
    "Q4_0": ("q4", 4, 32),
    "Q4_1": ("q4", 4, 32),
    "Q4_K": ("q4", 4, 32),
    "Q8_0": ("nbits", 8, 32),
    "Q5_0": ("nbits", 8, 32),
    "Q5_1": ("nbits", 8, 32),
    "Q5_K": ("nbits", 8, 32),
    "Q6_K": ("nbits", 8, 16),
    "Q2_K": ("nbits", 4, 16),
    "Q3_K": ("nbits", 4, 16),
}
# Q4_K_M-like: Q4_K matrices with V, down-projection and the untied head in Q6_K.
Q4_K_M = SyntheticSpec(
    qtype="Q4_K",
    embd_qtype="Q4_K",
    overrides={"attn_v": "Q6_K", "ffn_down": "Q6_K", "output": "Q6_K"},
    untied_head=True,
)


@pytest.mark.parametrize("qtype", ALL_TYPES)
def test_decoded_blocks_equal_gguf_dequantisation(qtype: str) -> None:
    rng = np.random.default_rng(3)
    raw = random_blocks(rng, qtype, 6, 512, 0.05)
    kind = gguf.GGMLQuantizationType[qtype]
    matrix = quants.decode(kind, raw, 6, 512)
    want = gguf.quants.dequantize(raw, kind).reshape(6, 512)
    got = matrix if isinstance(matrix, np.ndarray) else matrix.dequantize()
    assert np.array_equal(got, want)
    if qtype in KEPT:
        kept, bits, block = KEPT[qtype]
        if kept == "q4":
            assert isinstance(matrix, Q4_1Matrix)
        else:
            assert isinstance(matrix, QuantMatrix)
            assert (matrix.bits, matrix.block) == (bits, block)
            assert int(matrix.q.max()) < 2**bits
    else:
        assert isinstance(matrix, np.ndarray)


def _logits(model: onnx.ModelProto, weights: LlamaWeights) -> npt.NDArray[np.float64]:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), opts)
    c, n = weights.config, len(PROMPT)
    empty = np.zeros((1, c.n_kv_heads, 0, c.head_dim), np.float32)
    feeds: dict[str, npt.NDArray[np.generic]] = {
        "input_ids": np.array([PROMPT], np.int64),
        "attention_mask": np.ones((1, n), np.int64),
        "position_ids": np.arange(n, dtype=np.int64)[None],
    }
    for i in range(c.n_layers):
        feeds[f"past_key_values.{i}.key"] = feeds[f"past_key_values.{i}.value"] = empty
    out: npt.NDArray[np.float64] = sess.run(["logits"], feeds)[0].astype(np.float64)
    return out


def _reference(weights: LlamaWeights) -> npt.NDArray[np.float64]:
    ref = ReferenceLlama(weights)
    ids = np.array([PROMPT], np.int64)
    return ref.forward(ids, np.arange(len(PROMPT), dtype=np.int64)[None], ref.new_cache())


def _weight_ops(model: onnx.ModelProto) -> dict[str, set[tuple[int, int]]]:
    """Block matmul kinds: ``{"MatMulNBits": {(bits, block)}, "MatMul": ...}``."""
    found: dict[str, set[tuple[int, int]]] = {}
    for node in model.graph.node:
        if not node.name.startswith("layers."):
            continue
        attrs = {a.name: a.i for a in node.attribute}
        if node.op_type == "MatMulNBits":
            found.setdefault("MatMulNBits", set()).add((attrs["bits"], attrs["block_size"]))
        elif node.op_type == "MatMul" and node.name.endswith("/MatMul"):
            found.setdefault("MatMul", set()).add((32, 0))
    return found


@pytest.mark.parametrize("qtype", ALL_TYPES)
def test_each_type_is_exact_in_the_graph(tmp_path: Path, qtype: str) -> None:
    """fp32 activations: logits equal the float64 reference on the dequantised weights
    within float tolerance, and every quantised block matrix runs on MatMulNBits (no dense
    fallback): at the type's bits with int8 activations, as exact 4-bit halves for 8-bit
    integers with fp32 activations (bits=8 has no fast fp32 kernel)."""
    path = write_synthetic_gguf(tmp_path / "m.gguf", SyntheticSpec(qtype=qtype))
    weights, _ = read_gguf(path)
    if qtype in KEPT:
        _, bits, block = KEPT[qtype]
        int8_ops = _weight_ops(build_decoder(weights, "lossless4", True))
        assert int8_ops == {"MatMulNBits": {(bits, block)}}
    model = build_decoder(weights, "lossless4", False)
    want = _reference(weights)
    got = _logits(model, weights)
    assert float(np.abs(got - want).max()) <= LOGIT_RTOL * float(np.abs(want).max())
    assert np.array_equal(got[0].argmax(-1), want[0].argmax(-1))
    ops = _weight_ops(model)
    offsets = any(n.name.endswith("/MinsMatMul") for n in model.graph.node)
    assert offsets == (qtype in ("Q4_1", "Q4_K"))  # Q4_0's are zero: no offset matmul
    if qtype in KEPT:
        assert ops == {"MatMulNBits": {(4, block)}}
        halves = any(n.name.endswith("/hi/MatMulNBits") for n in model.graph.node)
        assert halves == (bits == 8)
    else:
        assert ops == {"MatMul": {(32, 0)}}


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q6_K", "Q2_K"])
def test_import_is_no_bigger_than_its_kernels_need(tmp_path: Path, qtype: str) -> None:
    """The blow-up this guards against: Q8_0 came out as fp32, 4x the file. Block
    matrices now cost at most their kernel's bits plus float32 scales and offsets
    (a dense float32 fallback would be 32 bits an element, far over the bound)."""
    spec = SyntheticSpec(qtype=qtype, embd_qtype=qtype)
    path = write_synthetic_gguf(tmp_path / "m.gguf", spec)
    model = import_gguf(path, tmp_path / "out", "m")
    blocks = sum(f.stat().st_size for f in model.glob("model.onnx.block-*.data"))
    weights, _ = read_gguf(path)
    elements = sum(
        m.out_features * m.in_features
        for b in weights.blocks
        for m in (b.wq, b.wk, b.wv, b.wo, b.w_gate, b.w_up, b.w_down)
        if not isinstance(m, np.ndarray)
    )
    _, bits, block = KEPT.get(qtype, ("", 4, 32))
    # per element: the integer, and per block a float32 scale, a float32 offset and at
    # most one byte of zero points; plus each block's two norm vectors
    bound = elements * (bits / 8 + 9 / block) + 8 * 1024 * weights.config.n_layers
    assert blocks <= bound, (blocks, bound)
    assert read_model_facts(model).quantization.startswith(f"{qtype}:")


def test_unsupported_type_is_refused_before_any_weight_is_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "iq.gguf"
    write_synthetic_gguf(path, SyntheticSpec(qtype="Q4_0", overrides={"ffn_up": "Q4_0"}))
    data = bytearray(path.read_bytes())
    # Retag blk.1.ffn_up.weight as IQ4_NL (same 32-element, 18-byte block as Q4_0).
    name = b"blk.1.ffn_up.weight"
    at = data.index(name) + len(name)
    n_dims = int.from_bytes(data[at : at + 4], "little")
    type_at = at + 4 + 8 * n_dims
    assert int.from_bytes(data[type_at : type_at + 4], "little") == gguf.GGMLQuantizationType.Q4_0
    data[type_at : type_at + 4] = int(gguf.GGMLQuantizationType.IQ4_NL).to_bytes(4, "little")
    path.write_bytes(bytes(data))

    def no_decoding(*args: object) -> None:
        raise AssertionError("a weight was decoded before the type check")

    monkeypatch.setattr(quants, "decode", no_decoding)
    with pytest.raises(GGUFFormatError, match="IQ4_NL") as info:
        import_gguf(path, tmp_path / "out", "m")
    assert info.value.tensor == "blk.1.ffn_up.weight"
    assert not (tmp_path / "out").exists()


def _chain_equals_full(model: Path, shards: list[Path], steps: int = 3) -> None:
    full = OrtStepper(model / "model.onnx")
    parts = [OrtStepper(d / "model.onnx") for d in shards]
    ids = np.array([PROMPT], np.int64)
    total = 0
    for _ in range(steps):
        seq = ids.shape[1]
        pos = np.arange(total, total + seq, dtype=np.int64)[None]
        mask = np.ones((1, total + seq), np.int64)
        want = full.step(ids, pos, mask)
        x: npt.NDArray[np.generic] = ids
        for part in parts:
            x = part.step(x, pos, mask)
        assert np.array_equal(x, want)
        total += seq
        ids = np.array([[int(np.argmax(want[0, -1]))]], np.int64)


SHARD_CASES = {**{q: SyntheticSpec(qtype=q) for q in QTYPES}, "Q4_K_M": Q4_K_M}


@pytest.mark.parametrize("int8", [True, False], ids=["int8", "fp32act"])
@pytest.mark.parametrize("case", sorted(SHARD_CASES))
def test_imported_type_shards_like_the_whole_model(tmp_path: Path, case: str, int8: bool) -> None:
    """Import (default int8 activations, or fp32 ones with 8-bit integers as 4-bit halves),
    split in two: chained shards give the whole model's logits bit for bit, and weights
    recovered from the directory rebuild it byte for byte."""
    path = write_synthetic_gguf(tmp_path / "m.gguf", SHARD_CASES[case])
    model = import_gguf(path, tmp_path / "model", "m", int8_activations=int8)
    shards = split_model_dir(model, [LayerRange(0, 1), LayerRange(1, 2)], tmp_path / "s")
    _chain_equals_full(model, shards)
    rebuilt = write_shard_dir(model, LayerRange(0, 2), tmp_path / "rebuilt")
    graphs = [onnx.load(str(d / "model.onnx")).SerializeToString() for d in (model, rebuilt)]
    assert graphs[0] == graphs[1]
    assert load_model_weights(model).config.arch == "llama"


def test_q4_k_m_mix_keeps_each_type_on_its_kernel(tmp_path: Path) -> None:
    """Q/K (Q4_K) and V (Q6_K) cannot share one kernel call: two calls and a Concat."""
    path = write_synthetic_gguf(tmp_path / "m.gguf", Q4_K_M)
    weights, _ = read_gguf(path)
    model = build_decoder(weights, "lossless4", False)
    names = {n.name for n in model.graph.node}
    assert {"layers.0.attn.qkv.part0/MatMulNBits", "layers.0.attn.qkv.part1/MatMulNBits"} <= names
    assert "layers.0.attn.qkv/Concat" in names
    assert _weight_ops(model) == {"MatMulNBits": {(4, 32), (4, 16)}}  # Q6_K as two halves
    assert _weight_ops(build_decoder(weights, "lossless4", True)) == {
        "MatMulNBits": {(4, 32), (8, 16)}
    }
    want = _reference(weights)
    got = _logits(model, weights)
    assert float(np.abs(got - want).max()) <= LOGIT_RTOL * float(np.abs(want).max())


def test_cli_prints_each_tensor_type_and_the_disk_size(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_synthetic_gguf(tmp_path / "m.gguf", Q4_K_M)
    status = cli_import.main([str(path), "--name", "m", "--out", str(tmp_path / "out")])
    assert status == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line.split()[1] for line in out.splitlines() if "blk." in line}
    assert lines["blk.0.attn_q.weight"] == "Q4_K"
    assert lines["blk.0.attn_v.weight"] == "Q6_K"
    assert lines["blk.1.attn_norm.weight"] == "F32"
    assert "types Q4_K:" in out and "directory" in out and "MiB" in out


@pytest.mark.parametrize("qtype", [q for q in QTYPES if q != "Q8_0"])
@pytest.mark.parametrize("tied", [True, False])
def test_quantised_tables_stay_integers(tmp_path: Path, qtype: str, tied: bool) -> None:
    """A non-Q8_0 embedding (and head) is gathered and multiplied as its integers: no
    float32 table in the graph, logits within float tolerance of the reference."""
    overrides = {} if tied else {"output": qtype}
    spec = SyntheticSpec(embd_qtype=qtype, untied_head=not tied, overrides=overrides)
    weights, _ = read_gguf(write_synthetic_gguf(tmp_path / "m.gguf", spec))
    assert isinstance(weights.token_embd, QuantMatrix)
    for int8 in (False, True):
        model = build_decoder(weights, "lossless4", int8)
        names = {t.name for t in model.graph.initializer}
        assert "model.embed_tokens.nbits_weight" in names
        assert not names & {"model.embed_tokens.weight", "lm_head.weight"}
        assert ("lm_head.nbits_weight" in names) == (not tied)
        # a server bounds token ids by the rows of any Gather on input_ids
        vocab = weights.config.vocab
        assert gather_table_rows(model).get("input_ids", vocab) == vocab
        if not int8:
            want = _reference(weights)
            got = _logits(model, weights)
            assert float(np.abs(got - want).max()) <= LOGIT_RTOL * float(np.abs(want).max())


@pytest.mark.parametrize("qtype", QTYPES)
def test_int8_limbs_stay_exact_for_every_type(tmp_path: Path, qtype: str) -> None:
    """fp32 activations carried as exact int8 limbs (per kernel block: 16 or 32) through
    4- and 8-bit kernels and quantised tables: still the float tolerance (measured <2e-6)."""
    spec = SyntheticSpec(qtype=qtype, embd_qtype=qtype)
    weights, _ = read_gguf(write_synthetic_gguf(tmp_path / "m.gguf", spec))
    model = build_decoder(weights, "lossless4", False, "gqa", int8_limbs=True)
    levels = {a.i for n in model.graph.node for a in n.attribute if a.name == "accuracy_level"}
    assert levels == {4}
    want = _reference(weights)
    got = _logits(model, weights)
    assert float(np.abs(got - want).max()) <= LOGIT_RTOL * float(np.abs(want).max())
