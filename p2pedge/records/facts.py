"""``p2pedge_model.json``: an imported decoder's facts, the one reader and its checks.

The importer writes it next to the graph so nothing needs to parse ONNX to know a model's
shape; shard servers pull it from peers before anything else, so it is hostile input:
its size is bounded before it is read, and every field is type- and range-checked (and
the fields checked against each other) before a :class:`ModelFacts` exists. Unknown keys
are ignored, so a newer writer's extra facts do not break an older reader.
Pure: stdlib only, usable from every layer.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from p2pedge.errors import ModelLoadError

FACTS_FILE = "p2pedge_model.json"
MAX_FACTS_BYTES = 1 << 20
# Bumped whenever the graph layout or its runtime config changes, so a split never mixes
# builder versions and `make model` re-imports (4: genai shares the KV buffer; 5: the exact
# fp32-activation head is the Q8_0 table as two 4-bit halves; 6: weights in one file per
# part, so a shard server fetches only its blocks' bytes).
FORMAT_VERSION = 6
VARIANTS = ("fp32", "lossless4")
ATTENTIONS = ("gqa", "ops")
ACTIVATIONS = ("silu", "gelu_tanh")
MAX_LAYERS = 1024
MAX_DIM = 1 << 20  # hidden, ffn, heads, head_dim
MAX_VOCAB = 1 << 22
MAX_CONTEXT = 1 << 24
_NAME = re.compile(r"^[A-Za-z0-9_.+-]{1,64}$")
_QUANTIZATION = re.compile(r"^([A-Z0-9_]{1,16}:[0-9]{1,9})(,[A-Z0-9_]{1,16}:[0-9]{1,9}){0,63}$")


class FactsError(ModelLoadError):
    """A facts file is unreadable, malformed or inconsistent; names the field at fault."""


@dataclass(frozen=True)
class ModelFacts:
    """Contents of ``p2pedge_model.json``. Fields after ``rope_factors`` are Gemma's (see
    ``LlamaConfig``); their defaults are Llama's behaviour."""

    arch: str
    n_layers: int
    hidden: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn: int
    vocab: int
    rope_base: float
    rms_eps: float
    context_length: int
    variant: str
    bos_token_id: int | None
    eos_token_id: int
    pad_token_id: int | None
    int8_activations: bool = False
    attention: str = "gqa"
    format_version: int = FORMAT_VERSION
    int8_limbs: bool = False
    quantization: str = ""  # GGUF tensor types and counts, e.g. "Q4_K:98,Q6_K:14,F32:61"
    rope_factors: tuple[float, ...] = ()  # Llama 3.1+ rope frequency factors
    activation: str = "silu"
    embed_scale: float = 1.0
    attn_scale: float = 0.0
    attn_softcap: float = 0.0
    final_softcap: float = 0.0
    sliding_window: int = 0
    swa_layers: tuple[bool, ...] = ()
    rope_base_swa: float = 0.0


def facts_dict(facts: ModelFacts) -> dict[str, Any]:
    """The JSON object :func:`parse_facts` reads back."""
    out = asdict(facts)
    out["rope_factors"] = list(facts.rope_factors)
    out["swa_layers"] = list(facts.swa_layers)
    return out


def _int(value: Any, key: str, low: int, high: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise FactsError(f"{FACTS_FILE}: {key!r} must be an integer in [{low}, {high}]")
    return value


def _float(value: Any, key: str, *, positive: bool = False) -> float:
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    if not ok or not math.isfinite(value) or value < 0 or (positive and value == 0):
        need = "positive" if positive else "non-negative"
        raise FactsError(f"{FACTS_FILE}: {key!r} must be a finite {need} number")
    return float(value)


def _bool(value: Any, key: str) -> bool:
    if not isinstance(value, bool):
        raise FactsError(f"{FACTS_FILE}: {key!r} must be true or false")
    return value


def _choice(value: Any, key: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise FactsError(f"{FACTS_FILE}: {key!r} must be one of {allowed}")
    return str(value)


def _checked(raw: dict[str, Any]) -> ModelFacts:
    def need(key: str) -> Any:
        if key not in raw:
            raise FactsError(f"{FACTS_FILE}: {key!r} is missing")
        return raw[key]

    arch = need("arch")
    if not isinstance(arch, str) or not _NAME.match(arch):
        raise FactsError(f"{FACTS_FILE}: 'arch' must be a short plain name")
    n_layers = _int(need("n_layers"), "n_layers", 1, MAX_LAYERS)
    vocab = _int(need("vocab"), "vocab", 1, MAX_VOCAB)

    def token(key: str, required: bool = False) -> int | None:
        value = need(key) if required else raw.get(key)
        return None if value is None and not required else _int(value, key, 0, vocab - 1)

    quantization = raw.get("quantization", "")
    if not isinstance(quantization, str) or (
        quantization and not _QUANTIZATION.match(quantization)
    ):
        raise FactsError(f"{FACTS_FILE}: 'quantization' must look like 'Q4_K:98,F32:61'")
    factors = raw.get("rope_factors", [])
    if not isinstance(factors, list) or len(factors) > MAX_DIM:
        raise FactsError(f"{FACTS_FILE}: 'rope_factors' must be a list")
    swa = raw.get("swa_layers", [])
    if not isinstance(swa, list) or len(swa) not in (0, n_layers):
        raise FactsError(f"{FACTS_FILE}: 'swa_layers' must be empty or one flag per block")
    eos = token("eos_token_id", required=True)
    assert eos is not None
    facts = ModelFacts(
        arch=arch,
        n_layers=n_layers,
        hidden=_int(need("hidden"), "hidden", 1, MAX_DIM),
        n_heads=_int(need("n_heads"), "n_heads", 1, MAX_DIM),
        n_kv_heads=_int(need("n_kv_heads"), "n_kv_heads", 1, MAX_DIM),
        head_dim=_int(need("head_dim"), "head_dim", 2, MAX_DIM),
        ffn=_int(need("ffn"), "ffn", 1, MAX_DIM),
        vocab=vocab,
        rope_base=_float(need("rope_base"), "rope_base", positive=True),
        rms_eps=_float(need("rms_eps"), "rms_eps", positive=True),
        context_length=_int(need("context_length"), "context_length", 1, MAX_CONTEXT),
        variant=_choice(need("variant"), "variant", VARIANTS),
        bos_token_id=token("bos_token_id"),
        eos_token_id=eos,
        pad_token_id=token("pad_token_id"),
        int8_activations=_bool(raw.get("int8_activations", False), "int8_activations"),
        attention=_choice(raw.get("attention", "gqa"), "attention", ATTENTIONS),
        format_version=_int(raw.get("format_version", 0), "format_version", 0, 1 << 16),
        int8_limbs=_bool(raw.get("int8_limbs", False), "int8_limbs"),
        quantization=quantization,
        rope_factors=tuple(_float(f, "rope_factors", positive=True) for f in factors),
        activation=_choice(raw.get("activation", "silu"), "activation", ACTIVATIONS),
        embed_scale=_float(raw.get("embed_scale", 1.0), "embed_scale", positive=True),
        attn_scale=_float(raw.get("attn_scale", 0.0), "attn_scale"),
        attn_softcap=_float(raw.get("attn_softcap", 0.0), "attn_softcap"),
        final_softcap=_float(raw.get("final_softcap", 0.0), "final_softcap"),
        sliding_window=_int(raw.get("sliding_window", 0), "sliding_window", 0, MAX_CONTEXT),
        swa_layers=tuple(_bool(f, "swa_layers") for f in swa),
        rope_base_swa=_float(raw.get("rope_base_swa", 0.0), "rope_base_swa"),
    )
    _consistent(facts)
    return facts


def _consistent(f: ModelFacts) -> None:
    """Cross-field rules the graph builder and the runtime rely on."""
    if f.n_kv_heads > f.n_heads or f.n_heads % f.n_kv_heads:
        raise FactsError(f"{FACTS_FILE}: n_heads {f.n_heads} is not a multiple of n_kv_heads")
    if f.head_dim % 2:
        raise FactsError(f"{FACTS_FILE}: head_dim {f.head_dim} must be even (rotary halves)")
    if f.rope_factors and len(f.rope_factors) != f.head_dim // 2:
        raise FactsError(f"{FACTS_FILE}: {len(f.rope_factors)} rope factors, need head_dim / 2")
    if any(f.swa_layers) != (f.sliding_window > 0):
        raise FactsError(f"{FACTS_FILE}: sliding_window and swa_layers disagree")
    if f.int8_limbs and (f.int8_activations or f.variant != "lossless4"):
        raise FactsError(f"{FACTS_FILE}: int8_limbs needs lossless4 with fp32 activations")


def parse_facts(data: bytes) -> ModelFacts:
    """Decode and check a facts file's bytes; raises :class:`FactsError`."""
    if len(data) > MAX_FACTS_BYTES:
        raise FactsError(f"{FACTS_FILE} is larger than {MAX_FACTS_BYTES} bytes")
    try:
        raw = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise FactsError(f"{FACTS_FILE} is not JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise FactsError(f"{FACTS_FILE} must hold a JSON object")
    return _checked(raw)


def read_facts(path: Path) -> ModelFacts:
    """Read ``path`` (a facts file, or a directory holding one), size-checked first."""
    path = path / FACTS_FILE if path.is_dir() else path
    try:
        if path.stat().st_size > MAX_FACTS_BYTES:
            raise FactsError(f"{path} is larger than {MAX_FACTS_BYTES} bytes")
        data = path.read_bytes()
    except OSError as exc:
        raise FactsError(f"cannot read {path}: {exc}") from exc
    try:
        return parse_facts(data)
    except FactsError as exc:
        raise FactsError(f"{path.parent}: {exc}") from exc


__all__ = [
    "FACTS_FILE",
    "FORMAT_VERSION",
    "FactsError",
    "ModelFacts",
    "facts_dict",
    "parse_facts",
    "read_facts",
]
