"""``phi3``: fused Q/K/V and gate/up tensors in the GGUF, NEOX rotary, SentencePiece vocab.

The reader splits the fused rows into the shared in-memory layout (the graph fuses them
back), so the graph is held to the reference within float tolerance, the split is checked
row for row against the fused tensor, and the imported directory shards bit-exactly.
llama.cpp's own top-1 on these files is in ``test_llamacpp_agreement.py``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import gguf
import numpy as np
import numpy.typing as npt
import onnxruntime as ort
import pytest

from p2pedge.ids import LayerRange
from p2pedge.models.convert.gguf_reader import GGUFFormatError, read_gguf
from p2pedge.models.convert.importer import import_gguf
from p2pedge.models.convert.layout import read_model_facts
from p2pedge.models.convert.onnx_graph import build_decoder
from p2pedge.models.convert.shards import split_model_dir
from p2pedge.models.convert.weights import as_float
from p2pedge.runtime.reference import ReferenceLlama
from p2pedge.testing.synthetic_gguf import SyntheticSpec, write_synthetic_gguf
from p2pedge.testing.tiny import OrtStepper

PROMPT = [5, 17, 33, 80, 2, 9, 100, 44, 61, 7]
LOGIT_RTOL = 1e-4
PHI3 = SyntheticSpec(arch="phi3", qtype="Q4_K", tokenizer="llama-spm", seed=3)


def _logits(model: bytes, n_layers: int, n_kv: int, head_dim: int) -> npt.NDArray[np.float64]:
    sess = ort.InferenceSession(model)
    n = len(PROMPT)
    empty = np.zeros((1, n_kv, 0, head_dim), np.float32)
    feeds: dict[str, npt.NDArray[np.generic]] = {
        "input_ids": np.array([PROMPT], np.int64),
        "attention_mask": np.ones((1, n), np.int64),
        "position_ids": np.arange(n, dtype=np.int64)[None],
    }
    for i in range(n_layers):
        feeds[f"past_key_values.{i}.key"] = feeds[f"past_key_values.{i}.value"] = empty
    out: npt.NDArray[np.float64] = sess.run(["logits"], feeds)[0].astype(np.float64)
    return out


@pytest.mark.parametrize("qtype", ["Q4_K", "Q8_0", "F16"])
def test_phi3_fused_tensors_split_exactly_and_match_the_reference(
    tmp_path: Path, qtype: str
) -> None:
    spec = dataclasses.replace(PHI3, qtype=qtype)
    path = write_synthetic_gguf(tmp_path / "phi3.gguf", spec)
    weights, _ = read_gguf(path)
    c = weights.config
    assert c.arch == "phi3"
    # The split is the fused tensor's rows, in order: Q, K, V and gate, up.
    reader = gguf.GGUFReader(path)
    fused = {t.name: t for t in reader.tensors}
    qkv, gate_up = (
        gguf.quants.dequantize(fused[n].data, fused[n].tensor_type)
        for n in ("blk.1.attn_qkv.weight", "blk.1.ffn_up.weight")
    )
    block = weights.blocks[1]
    split_qkv = np.concatenate([as_float(block.wq), as_float(block.wk), as_float(block.wv)])
    assert np.array_equal(split_qkv, qkv.reshape(split_qkv.shape))
    split_gu = np.concatenate([as_float(block.w_gate), as_float(block.w_up)])
    assert np.array_equal(split_gu, gate_up.reshape(split_gu.shape))
    ref = ReferenceLlama(weights)
    ids, pos = np.array([PROMPT], np.int64), np.arange(len(PROMPT), dtype=np.int64)[None]
    want = ref.forward(ids, pos, ref.new_cache())
    for int8 in (False, True):
        model = build_decoder(weights, "lossless4", int8).SerializeToString()
        got = _logits(model, c.n_layers, c.n_kv_heads, c.head_dim)
        tol = (0.05 if int8 else LOGIT_RTOL) * float(np.abs(want).max())
        assert float(np.abs(got - want).max()) <= tol, int8


def test_phi3_imports_names_its_arch_and_shards_bit_exactly(tmp_path: Path) -> None:
    path = write_synthetic_gguf(tmp_path / "phi3.gguf", PHI3)
    model = import_gguf(path, tmp_path / "phi3", "phi3")
    facts = read_model_facts(model)
    assert (facts.arch, facts.quantization.split(":")[0]) == ("phi3", "Q4_K")
    shards = split_model_dir(model, [LayerRange(0, 1), LayerRange(1, 2)], tmp_path / "shards")
    full = OrtStepper(model / "model.onnx")
    parts = [OrtStepper(d / "model.onnx") for d in shards]
    ids = np.array([PROMPT], np.int64)
    total = 0
    for _ in range(3):
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


def test_partial_rotary_and_longrope_are_refused_by_name(tmp_path: Path) -> None:
    path = write_synthetic_gguf(tmp_path / "phi3.gguf", PHI3)
    head_dim = PHI3.shape.hidden // PHI3.shape.n_heads
    data = path.read_bytes()
    key = b"phi3.rope.dimension_count"
    at = data.index(key) + len(key) + 4  # then the value type (uint32), then the value
    partial = data[:at] + (head_dim * 3 // 4).to_bytes(4, "little") + data[at + 4 :]
    (tmp_path / "partial.gguf").write_bytes(partial)
    with pytest.raises(GGUFFormatError, match=r"rope\.dimension_count"):
        read_gguf(tmp_path / "partial.gguf")
    long = write_synthetic_gguf(tmp_path / "long.gguf", SyntheticSpec(arch="phi3", long_rope=True))
    with pytest.raises(GGUFFormatError, match=r"rope_factors_long\.weight.*LongRoPE"):
        read_gguf(long)
