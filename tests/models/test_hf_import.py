"""Hugging Face directories (``config.json`` + ``*.safetensors`` + ``tokenizer.json``):
the import equals the GGUF conversion of the same directory (llama.cpp's conventions, held
to llama.cpp itself in ``test_llamacpp_agreement.py``), quantised imports match the numpy
reference, onnxruntime-genai runs the result, and hostile files are refused by name."""

from __future__ import annotations

import dataclasses
import json
import struct
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
import pytest

from p2pedge.models.__main__ import main as models_main
from p2pedge.models.convert.gguf_reader import read_gguf
from p2pedge.models.convert.hf_reader import HFFormatError, read_hf
from p2pedge.models.convert.importer import import_gguf, import_hf
from p2pedge.models.convert.layout import read_model_facts
from p2pedge.models.convert.safetensors_reader import SafetensorsError, read_header
from p2pedge.models.convert.weights import LlamaConfig
from p2pedge.runtime.reference import ReferenceLlama
from p2pedge.testing.synthetic_gguf import SyntheticShape
from p2pedge.testing.synthetic_hf import HFSpec, hf_to_gguf, write_synthetic_hf
from p2pedge.testing.tiny import OrtStepper

PROMPT = [5, 17, 33, 80, 2, 9, 100, 44, 61, 7]
LOGIT_RTOL = 1e-4


def _logits(model_dir: Path, cfg: LlamaConfig) -> npt.NDArray[np.float64]:
    sess = ort.InferenceSession(str(model_dir / "model.onnx"))
    n = len(PROMPT)
    empty = np.zeros((1, cfg.n_kv_heads, 0, cfg.head_dim), np.float32)
    feeds: dict[str, npt.NDArray[np.generic]] = {
        "input_ids": np.array([PROMPT], np.int64),
        "attention_mask": np.ones((1, n), np.int64),
        "position_ids": np.arange(n, dtype=np.int64)[None],
    }
    for i in range(cfg.n_layers):
        feeds[f"past_key_values.{i}.key"] = feeds[f"past_key_values.{i}.value"] = empty
    out: npt.NDArray[np.float64] = sess.run(["logits"], feeds)[0].astype(np.float64)
    return out


@pytest.mark.parametrize(
    "spec",
    [
        HFSpec(family="llama", dtype="BF16", llama3_rope=True, seed=1),
        HFSpec(family="mistral", dtype="F16", sharded=True, seed=2),
        HFSpec(family="qwen2", dtype="BF16", tied=False, seed=3),
        HFSpec(family="qwen3", dtype="F32", seed=4),
        HFSpec(family="phi3", dtype="BF16", seed=10),
        HFSpec(family="gemma2", dtype="BF16", seed=11),
        HFSpec(
            family="gemma3_text",
            dtype="F16",
            shape=dataclasses.replace(SyntheticShape(), n_layers=6),
            seed=12,
        ),
    ],
    ids=lambda s: f"{s.family}-{s.dtype}",
)
def test_hf_import_equals_its_gguf_conversion(tmp_path: Path, spec: HFSpec) -> None:
    """Same hyper-parameters (every Gemma and Llama 3 field included) and the same logits
    from both importers; Gemma's configs also carry windows, soft caps and rope bases."""
    hf = write_synthetic_hf(tmp_path / "hf", spec)
    gguf_path = hf_to_gguf(hf, tmp_path / "m.gguf")
    from_hf = import_hf(hf, tmp_path / "from-hf", "m", quant="F32", int8_activations=False)
    from_gguf = import_gguf(gguf_path, tmp_path / "from-gguf", "m", int8_activations=False)
    hf_weights, _, _ = read_hf(hf, "F32")
    gguf_weights, _ = read_gguf(gguf_path)
    cfg = hf_weights.config
    theirs = gguf_weights.config
    assert dataclasses.replace(cfg, rope_factors=()) == dataclasses.replace(theirs, rope_factors=())
    assert np.allclose(cfg.rope_factors, theirs.rope_factors, rtol=1e-6)
    if spec.family.startswith("gemma"):
        assert (cfg.activation, cfg.sliding_window, any(cfg.swa_layers)) == ("gelu_tanh", 8, True)
    assert bool(cfg.rope_factors) == spec.llama3_rope
    got, want = _logits(from_hf, cfg), _logits(from_gguf, cfg)
    assert float(np.abs(got - want).max()) <= LOGIT_RTOL * float(np.abs(want).max())
    assert (from_hf / "tokenizer.json").read_bytes() == (hf / "tokenizer.json").read_bytes()


@pytest.mark.parametrize("quant", ["Q4_1", "Q8_0", "Q4_0"])
def test_quantised_hf_import_matches_the_reference_and_names_itself(
    tmp_path: Path, quant: str
) -> None:
    hf = write_synthetic_hf(tmp_path / "hf", HFSpec(family="qwen2", seed=5))
    model = import_hf(hf, tmp_path / "model", "m", quant=quant, int8_activations=False)
    weights, ids, summary = read_hf(hf, quant)
    facts = read_model_facts(model)
    assert (facts.arch, facts.quantization, facts.eos_token_id) == ("qwen2", summary, ids.eos)
    counts = dict(item.split(":") for item in summary.split(","))
    # 7 matrices per block, 2 blocks, and the (tied) embedding as Q8_0
    assert counts == ({"Q8_0": "15"} if quant == "Q8_0" else {quant: "14", "Q8_0": "1"}) | {
        "F32": "11"
    }
    ref = ReferenceLlama(weights)
    ids_, pos = np.array([PROMPT], np.int64), np.arange(len(PROMPT), dtype=np.int64)[None]
    want = ref.forward(ids_, pos, ref.new_cache())
    got = _logits(model, weights.config)
    assert float(np.abs(got - want).max()) <= LOGIT_RTOL * float(np.abs(want).max())
    # the quantised model is the HF model up to the weights' rounding (measured logit
    # correlation 0.9997 for Q8_0, 0.966-0.969 for Q4_0/Q4_1), not some other model
    full, _, _ = read_hf(hf, "F32")
    exact = ReferenceLlama(full).forward(ids_, pos, ReferenceLlama(full).new_cache())
    correlation = float(np.corrcoef(exact.ravel(), want.ravel())[0, 1])
    assert correlation >= (0.999 if quant == "Q8_0" else 0.95)
    assert float(np.abs(exact - want).max()) > 0  # and it was quantised


def test_genai_runs_an_hf_import_like_the_reference(tmp_path: Path) -> None:
    import onnxruntime_genai as og

    hf = write_synthetic_hf(tmp_path / "hf", HFSpec(family="llama", llama3_rope=True, seed=6))
    model_dir = import_hf(hf, tmp_path / "model", "m", quant="Q8_0", int8_activations=False)
    weights, _, _ = read_hf(hf, "Q8_0")
    want = ReferenceLlama(weights).greedy(PROMPT, 6)
    model = og.Model(str(model_dir))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(PROMPT) + len(want))
    generator = og.Generator(model, params)
    generator.append_tokens(PROMPT)
    got: list[int] = []
    while not generator.is_done():
        generator.generate_next_token()
        got.append(int(generator.get_next_tokens()[0]))
    assert got == want
    step = OrtStepper(model_dir / "model.onnx")  # and the plain session agrees
    logits = step.step(
        np.array([PROMPT], np.int64),
        np.arange(len(PROMPT), dtype=np.int64)[None],
        np.ones((1, len(PROMPT)), np.int64),
    )
    assert int(np.argmax(logits[0, -1])) == want[0]


def test_the_cli_imports_and_refuses_with_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    hf = write_synthetic_hf(tmp_path / "hf", HFSpec(seed=7))
    out = tmp_path / "model"
    assert models_main(["import-hf", str(hf), "--name", "tiny", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "types Q4_1:14" in printed and read_model_facts(out).arch == "llama"
    assert read_model_facts(out).int8_activations  # the default variant, as import-gguf's
    config = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps({**config, "model_type": "falcon"}))
    assert models_main(["import-hf", str(hf), "--name", "tiny", "--out", str(out)]) == 2
    assert "model_type 'falcon' unsupported" in capsys.readouterr().err
    assert read_model_facts(out).arch == "llama"  # the earlier import is left as it was


def _rewrite_header(path: Path, edit: dict[str, object]) -> None:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    header.update(edit)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    body = data[8 + n :]
    path.write_bytes(struct.pack("<Q", len(text)) + text + body)


def test_hostile_safetensors_are_refused_before_allocation(tmp_path: Path) -> None:
    hf = write_synthetic_hf(tmp_path / "hf", HFSpec(seed=8))
    path = hf / "model.safetensors"
    pristine = path.read_bytes()
    name = "model.norm.weight"
    entry = read_header(path)[name]
    begin = entry.start - 8 - struct.unpack("<Q", pristine[:8])[0]
    cases: list[tuple[bytes | dict[str, object], str]] = [
        (struct.pack("<Q", 1 << 62) + pristine[8:], "header of"),
        (pristine[:5], "shorter than"),
        (pristine[:-100], "outside the data section"),
        ({name: {"dtype": "I8", "shape": [256], "data_offsets": [0, 256]}}, "dtype 'I8'"),
        ({name: {"dtype": "BF16", "shape": [257], "data_offsets": [begin, begin + 512]}}, "bytes"),
        ({name: {"dtype": "BF16", "shape": [-1], "data_offsets": [0, 0]}}, "negative"),
        ({name: {"dtype": "BF16", "shape": [256], "data_offsets": [0, 512]}}, "overlaps"),
        ({name: {"dtype": "BF16", "shape": "256", "data_offsets": [0, 512]}}, "shape must"),
    ]
    for case, match in cases:
        if isinstance(case, bytes):
            path.write_bytes(case)
        else:
            path.write_bytes(pristine)
            _rewrite_header(path, case)
        with pytest.raises(SafetensorsError, match=match):
            read_hf(hf)
    path.write_bytes(pristine)
    nan = np.full(256, np.nan, np.float32).view(np.uint32) >> 16
    data = bytearray(pristine)
    data[entry.start : entry.end] = nan.astype("<u2").tobytes()
    path.write_bytes(bytes(data))
    with pytest.raises(SafetensorsError, match=f"{name}: contains NaN"):
        read_hf(hf, "F32")


def test_bad_directories_are_refused_by_name(tmp_path: Path) -> None:
    hf = write_synthetic_hf(tmp_path / "hf", HFSpec(sharded=True, seed=9))
    index = hf / "model.safetensors.index.json"
    good = json.loads(index.read_text())
    first = next(iter(good["weight_map"]))
    for file, match in (("../evil.safetensors", "not a plain file"), ("x.safetensors", "missing")):
        index.write_text(json.dumps({"weight_map": {**good["weight_map"], first: file}}))
        with pytest.raises(SafetensorsError, match=match):
            read_hf(hf)
    index.write_text(json.dumps(good))
    config = json.loads((hf / "config.json").read_text())
    for edit, match in (
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling"),
        ({"hidden_act": "gelu"}, "activation 'gelu'"),
        ({"num_key_value_heads": 3}, "inconsistent"),
        ({"hidden_size": "256"}, "hidden_size"),
        ({"eos_token_id": 10**6}, "outside the vocabulary"),
        ({"intermediate_size": 384}, r"mlp\.down_proj\.weight: shape \(256, 512\)"),
    ):
        (hf / "config.json").write_text(json.dumps({**config, **edit}))
        with pytest.raises(HFFormatError, match=match):
            read_hf(hf)
    (hf / "config.json").write_text(json.dumps(config))
    (hf / "tokenizer.json").unlink()
    with pytest.raises(HFFormatError, match=r"no tokenizer\.json"):
        read_hf(hf)
