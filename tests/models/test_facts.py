"""The one reader of ``p2pedge_model.json`` (``p2pedge.records.facts``): what the importer
writes reads back equal, and every field a peer could send wrong is refused by name."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from p2pedge.errors import ModelLoadError
from p2pedge.models.convert.layout import model_facts, token_ids
from p2pedge.models.convert.weights import LlamaConfig, LlamaWeights
from p2pedge.protocols.pipeline.serving import model_layers
from p2pedge.records.facts import (
    FACTS_FILE,
    MAX_FACTS_BYTES,
    FactsError,
    ModelFacts,
    facts_dict,
    parse_facts,
    read_facts,
)
from p2pedge.testing.tiny import tiny_tokenizer_spec

GOOD = ModelFacts(
    arch="gemma2",
    n_layers=2,
    hidden=256,
    n_heads=4,
    n_kv_heads=2,
    head_dim=64,
    ffn=512,
    vocab=400,
    rope_base=10000.0,
    rms_eps=1e-6,
    context_length=128,
    variant="lossless4",
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=None,
    int8_activations=True,
    quantization="Q4_K:14,F32:9",
    activation="gelu_tanh",
    embed_scale=16.0,
    attn_softcap=50.0,
    final_softcap=30.0,
    sliding_window=4096,
    swa_layers=(True, False),
    rope_factors=(1.0,) * 32,
)


def _bytes(obj: Any) -> bytes:
    return json.dumps(obj).encode()


def test_round_trip_and_unknown_keys_are_ignored() -> None:
    raw = facts_dict(GOOD)
    assert parse_facts(_bytes(raw)) == GOOD
    assert parse_facts(_bytes({**raw, "license": "apache-2.0", "future": [1]})) == GOOD


def test_the_importers_facts_read_back(tmp_path: Path) -> None:
    """``model_facts`` (what the importer writes) and ``read_facts`` agree, on disk."""
    spec = tiny_tokenizer_spec()
    cfg = LlamaConfig(2, 64, 4, 2, 16, 128, len(spec.tokens), 10000.0, 1e-5, 64)
    weights = LlamaWeights(cfg, None, (), None, None)  # type: ignore[arg-type]
    facts = model_facts(weights, token_ids(spec), "fp32", False)
    (tmp_path / FACTS_FILE).write_text(json.dumps(facts_dict(facts)))
    assert read_facts(tmp_path) == facts == read_facts(tmp_path / FACTS_FILE)
    assert model_layers(tmp_path) == 2


BAD: list[tuple[str, Any, str]] = [
    ("arch", "../etc", "arch"),
    ("arch", 7, "arch"),
    ("n_layers", 0, "n_layers"),
    ("n_layers", True, "n_layers"),
    ("n_layers", 2.0, "n_layers"),
    ("n_layers", 10**9, "n_layers"),
    ("hidden", "256", "hidden"),
    ("vocab", -1, "vocab"),
    ("rope_base", 0, "rope_base"),
    ("rms_eps", float("nan"), "rms_eps"),
    ("rms_eps", float("inf"), "rms_eps"),
    ("variant", "fp8", "variant"),
    ("attention", "flash", "attention"),
    ("activation", "relu", "activation"),
    ("eos_token_id", 400, "eos_token_id"),
    ("eos_token_id", None, "eos_token_id"),
    ("bos_token_id", -1, "bos_token_id"),
    ("int8_activations", 1, "int8_activations"),
    ("quantization", "Q4_K:14;rm -rf", "quantization"),
    ("rope_factors", [1.0, -1.0] * 16, "rope_factors"),
    ("rope_factors", "1,2", "rope_factors"),
    ("rope_factors", [1.0] * 31, "rope factors"),
    ("swa_layers", [True], "swa_layers"),
    ("swa_layers", [1, 0], "swa_layers"),
    ("swa_layers", [False, False], "disagree"),
    ("embed_scale", 0, "embed_scale"),
    ("attn_softcap", -50, "attn_softcap"),
    ("sliding_window", -1, "sliding_window"),
    ("n_kv_heads", 3, "multiple of n_kv_heads"),
    ("head_dim", 63, "even"),
]


@pytest.mark.parametrize(("key", "value", "match"), BAD)
def test_every_bad_field_is_refused_by_name(key: str, value: Any, match: str) -> None:
    raw = {**facts_dict(GOOD), key: value}
    with pytest.raises(FactsError, match=match):
        parse_facts(_bytes(raw))


@pytest.mark.parametrize("key", ["arch", "n_layers", "hidden", "vocab", "variant", "eos_token_id"])
def test_missing_required_fields_are_named(key: str) -> None:
    raw = facts_dict(GOOD)
    del raw[key]
    with pytest.raises(FactsError, match=key):
        parse_facts(_bytes(raw))


@pytest.mark.parametrize(
    "data",
    [b"[1, 2]", b"\xff\xfe", b"{", b"[" * 100_000 + b"]" * 100_000, b"x" * (MAX_FACTS_BYTES + 1)],
)
def test_not_a_facts_object_is_a_typed_error(data: bytes) -> None:
    with pytest.raises(FactsError):
        parse_facts(data)


def test_an_oversized_file_is_refused_before_it_is_read(tmp_path: Path) -> None:
    path = tmp_path / FACTS_FILE
    with path.open("wb") as f:
        f.truncate(MAX_FACTS_BYTES + 1)  # sparse: refused on its size
    with pytest.raises(FactsError, match="larger than"):
        read_facts(path)
    with pytest.raises(ModelLoadError):  # what the pipeline's callers catch
        model_layers(tmp_path)
    with pytest.raises(ModelLoadError, match="cannot read"):
        read_facts(tmp_path / "missing.json")
