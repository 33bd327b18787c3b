"""Read a Hugging Face model directory (``config.json``, ``*.safetensors``, tokenizer files)
into :class:`LlamaWeights`, quantising the block matrices on the way.

Families: ``llama`` and ``mistral`` (our ``llama``; Llama 3's ``rope_scaling`` of type
``llama3`` becomes per-frequency factors as llama.cpp computes them), ``qwen2`` (Q/K/V
biases), ``qwen3`` (per-head Q/K norms), ``phi3`` (fused ``qkv_proj`` and
``gate_up_proj``, split by rows), ``gemma2`` and ``gemma3_text`` (norm weights get Gemma's
+1 offset, as llama.cpp's converter adds it; window, soft caps and rope bases from the
config). Hugging Face already stores Q/K rows in the rotate-half layout, so nothing is
permuted. Quantisation uses the GGUF block formats (the
``gguf`` package's quantisers), so the result is exactly what a GGUF of that type holds and
the graph maps it onto ``MatMulNBits`` without further rounding: ``Q4_0``/``Q4_1``/``Q8_0``
for block matrices with a Q8_0 embedding (and head), or ``F16``/``F32`` left dense.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from p2pedge.errors import ModelLoadError
from p2pedge.models.convert import quants
from p2pedge.models.convert.safetensors_reader import SafetensorsDir
from p2pedge.models.convert.weights import F32, LlamaBlock, LlamaConfig, LlamaWeights, Matrix

FAMILIES = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "phi3": "phi3",
    "gemma2": "gemma2",
    "gemma3_text": "gemma3",
}
GEMMA = ("gemma2", "gemma3")
QUANTS = ("Q4_1", "Q4_0", "Q8_0", "F16", "F32")
MAX_CONFIG_BYTES = 1 << 20
MAX_TOKENIZER_BYTES = 64 << 20
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


class HFFormatError(ModelLoadError):
    """A Hugging Face directory is unsupported or malformed; names the file and key."""


@dataclass(frozen=True)
class HFTokenIds:
    bos: int | None
    eos: int
    pad: int | None


def _json(path: Path, limit: int) -> dict[str, Any]:
    try:
        if path.stat().st_size > limit:
            raise HFFormatError(f"{path.name} is larger than {limit} bytes")
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise HFFormatError(f"cannot read {path.name}: {exc}") from exc
    if not isinstance(data, dict):
        raise HFFormatError(f"{path.name} must hold a JSON object")
    return data


def _num(
    cfg: dict[str, Any], key: str, default: float | None = None, *, integer: bool = True
) -> Any:
    value = cfg.get(key, default)
    kinds = (int,) if integer else (int, float)
    if value is None or isinstance(value, bool) or not isinstance(value, kinds):
        raise HFFormatError(f"config.json: {key!r} must be a number")
    if not math.isfinite(value) or value <= 0:
        raise HFFormatError(f"config.json: {key!r} must be positive")
    return value


def _llama3_factors(scaling: dict[str, Any], head_dim: int, base: float) -> tuple[float, ...]:
    """Llama 3.1's rope scaling as per-frequency divisors of ``inv_freq`` (llama.cpp's
    ``rope_freqs``): 1 above the high-frequency cut-off, ``factor`` below the low one,
    a smooth blend between."""
    factor = float(_num(scaling, "factor", integer=False))
    low = float(_num(scaling, "low_freq_factor", integer=False))
    high = float(_num(scaling, "high_freq_factor", integer=False))
    old = float(_num(scaling, "original_max_position_embeddings"))
    if high <= low:
        raise HFFormatError("config.json: rope_scaling high_freq_factor <= low_freq_factor")
    out = []
    for i in range(head_dim // 2):
        wavelen = 2 * math.pi * base ** (2 * i / head_dim)
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return tuple(out)


def hf_config(cfg: dict[str, Any]) -> LlamaConfig:
    """``config.json`` as hyper-parameters; an unsupported family or feature is refused."""
    family = cfg.get("model_type")
    if family not in FAMILIES:
        raise HFFormatError(
            f"config.json: model_type {family!r} unsupported (only {sorted(FAMILIES)})"
        )
    arch = FAMILIES[family]
    hidden = int(_num(cfg, "hidden_size"))
    n_heads = int(_num(cfg, "num_attention_heads"))
    head_dim = cfg.get("head_dim") or hidden // n_heads
    head_dim = int(_num({"head_dim": head_dim}, "head_dim"))
    base = float(_num(cfg, "rope_theta", 10000.0, integer=False))
    factors: tuple[float, ...] = ()
    scaling = cfg.get("rope_scaling")
    if isinstance(scaling, dict) and scaling.get("rope_type", scaling.get("type")) == "llama3":
        factors = _llama3_factors(scaling, head_dim, base)
    elif scaling is not None:
        raise HFFormatError(f"config.json: rope_scaling {scaling!r} unsupported")
    config = LlamaConfig(
        n_layers=int(_num(cfg, "num_hidden_layers")),
        hidden=hidden,
        n_heads=n_heads,
        n_kv_heads=int(_num(cfg, "num_key_value_heads", n_heads)),
        head_dim=head_dim,
        ffn=int(_num(cfg, "intermediate_size")),
        vocab=int(_num(cfg, "vocab_size")),
        rope_base=base,
        rms_eps=float(_num(cfg, "rms_norm_eps", integer=False)),
        context_length=int(_num(cfg, "max_position_embeddings")),
        arch=arch,
        rope_factors=factors,
    )
    if config.n_heads % config.n_kv_heads or config.head_dim % 2 or config.n_layers > 1024:
        raise HFFormatError(f"config.json: inconsistent hyper-parameters {config}")
    if cfg.get("partial_rotary_factor", 1.0) != 1.0:  # e.g. Phi-4-mini
        raise HFFormatError("config.json: partial_rotary_factor unsupported")
    act = cfg.get("hidden_activation") or cfg.get("hidden_act", "silu")
    if act != ("gelu_pytorch_tanh" if arch in GEMMA else "silu"):
        raise HFFormatError(f"config.json: activation {act!r} unsupported for {family}")
    return _gemma(cfg, config) if arch in GEMMA else config


def _gemma(cfg: dict[str, Any], c: LlamaConfig) -> LlamaConfig:
    """Gemma 2/3's extras, as llama.cpp reads them from the converted GGUF."""
    gemma2 = c.arch == "gemma2"
    window = int(cfg.get("sliding_window") or 0)
    if gemma2:
        swa = tuple(i % 2 == 0 for i in range(c.n_layers))
    elif isinstance(cfg.get("layer_types"), list) and len(cfg["layer_types"]) == c.n_layers:
        swa = tuple(t == "sliding_attention" for t in cfg["layer_types"])
    else:
        n = int(_num(cfg, "sliding_window_pattern", 6))
        swa = tuple(i % n < n - 1 for i in range(c.n_layers))
    scalar = float(_num(cfg, "query_pre_attn_scalar", c.head_dim, integer=False))
    caps = [cfg.get(k) for k in ("attn_logit_softcapping", "final_logit_softcapping")]
    if not all(v is None or (isinstance(v, int | float) and v >= 0) for v in caps):
        raise HFFormatError("config.json: soft-capping values must be numbers")
    return dataclasses.replace(
        c,
        activation="gelu_tanh",
        embed_scale=float(np.sqrt(np.float32(c.hidden))),
        attn_scale=0.0 if scalar == c.head_dim else scalar**-0.5,
        attn_softcap=float(caps[0] or 0.0) if gemma2 else 0.0,
        final_softcap=float(caps[1] or 0.0),
        sliding_window=window if window and any(swa) else 0,
        swa_layers=swa if window and any(swa) else (),
        rope_base_swa=c.rope_base
        if gemma2
        else float(_num(cfg, "rope_local_base_freq", 10000.0, integer=False)),
    )


def token_ids(cfg: dict[str, Any], vocab: int) -> HFTokenIds:
    def one(key: str) -> int | None:
        value = cfg.get(key)
        if isinstance(value, list):
            value = value[0] if value else None  # several EOS ids: the first is the main one
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < vocab:
            raise HFFormatError(f"config.json: {key} {value!r} outside the vocabulary")
        return value

    eos = one("eos_token_id")
    if eos is None:
        raise HFFormatError("config.json names no eos_token_id")
    return HFTokenIds(one("bos_token_id"), eos, one("pad_token_id"))


def check_tokenizer(directory: Path) -> None:
    """``tokenizer.json`` (required) and ``tokenizer_config.json`` must be bounded JSON
    objects; they are copied as they are, for the runtimes to parse."""
    if not (directory / "tokenizer.json").is_file():
        raise HFFormatError(f"{directory} has no tokenizer.json")
    tokenizer = _json(directory / "tokenizer.json", MAX_TOKENIZER_BYTES)
    if not isinstance(tokenizer.get("model"), dict):
        raise HFFormatError("tokenizer.json has no 'model' object")
    if (directory / "tokenizer_config.json").is_file():
        _json(directory / "tokenizer_config.json", MAX_TOKENIZER_BYTES)


class _Quantiser:
    def __init__(self, quant: str) -> None:
        if quant not in QUANTS:
            raise HFFormatError(f"quantisation {quant!r} is not one of {QUANTS}")
        self.quant = quant
        self.counts: dict[str, int] = {}

    def _count(self, kind: str) -> None:
        self.counts[kind] = self.counts.get(kind, 0) + 1

    def matrix(self, values: F32) -> Matrix:
        out, inp = values.shape
        if self.quant == "F32":
            self._count("F32")
            return values
        if self.quant == "F16":
            self._count("F16")
            return values.astype(np.float16).astype(np.float32)
        kind = gguf.GGMLQuantizationType[self.quant]
        self._count(self.quant)
        return quants.decode(kind, gguf.quants.quantize(values, kind), out, inp)

    def table(self, values: F32) -> F32:
        """An embedding or head table: Q8_0 values (recovered exactly by the builder)."""
        if self.quant in ("F32", "F16"):
            return self.matrix(values)  # type: ignore[return-value]
        self._count("Q8_0")
        kind = gguf.GGMLQuantizationType.Q8_0
        raw = gguf.quants.quantize(values, kind)
        return np.asarray(gguf.quants.dequantize(raw, kind), np.float32).reshape(values.shape)

    def vector(self, values: F32) -> F32:
        self._count("F32")
        return values

    def summary(self) -> str:
        return ",".join(f"{k}:{n}" for k, n in sorted(self.counts.items(), key=lambda kv: -kv[1]))


def _names(c: LlamaConfig, i: int) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Block ``i``'s tensors: role -> (Hugging Face name, shape)."""
    h, f, d = c.hidden, c.ffn, c.head_dim
    q_out, kv_out = c.n_heads * d, c.n_kv_heads * d
    p, a = f"model.layers.{i}.", f"model.layers.{i}.self_attn."
    out = {
        "attn_norm": (p + "input_layernorm.weight", (h,)),
        "wo": (a + "o_proj.weight", (h, q_out)),
        "w_down": (p + "mlp.down_proj.weight", (h, f)),
    }
    if c.arch == "phi3":
        out["qkv"] = (a + "qkv_proj.weight", (q_out + 2 * kv_out, h))
        out["gate_up"] = (p + "mlp.gate_up_proj.weight", (2 * f, h))
    else:
        out |= {
            "wq": (a + "q_proj.weight", (q_out, h)),
            "wk": (a + "k_proj.weight", (kv_out, h)),
            "wv": (a + "v_proj.weight", (kv_out, h)),
            "w_gate": (p + "mlp.gate_proj.weight", (f, h)),
            "w_up": (p + "mlp.up_proj.weight", (f, h)),
        }
    if c.arch in GEMMA:  # Gemma's post_attention_layernorm is the attention's post norm
        out["attn_post_norm"] = (p + "post_attention_layernorm.weight", (h,))
        out["ffn_norm"] = (p + "pre_feedforward_layernorm.weight", (h,))
        out["ffn_post_norm"] = (p + "post_feedforward_layernorm.weight", (h,))
    else:
        out["ffn_norm"] = (p + "post_attention_layernorm.weight", (h,))
    if c.arch == "qwen2":
        sizes = {"q": q_out, "k": kv_out, "v": kv_out}
        out |= {f"b{x}": (a + f"{x}_proj.bias", (n,)) for x, n in sizes.items()}
    if c.arch in ("qwen3", "gemma3"):
        out |= {"q_norm": (a + "q_norm.weight", (d,)), "k_norm": (a + "k_norm.weight", (d,))}
    return out


def _expected(c: LlamaConfig) -> dict[str, tuple[int, ...]]:
    out: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (c.vocab, c.hidden),
        "model.norm.weight": (c.hidden,),
    }
    for i in range(c.n_layers):
        out |= dict(_names(c, i).values())
    return out


def read_hf(directory: Path, quant: str = "Q4_1") -> tuple[LlamaWeights, HFTokenIds, str]:
    """Weights, token ids and a ``"Q4_1:98,F32:61"`` summary of a Hugging Face directory."""
    if not directory.is_dir():
        raise HFFormatError(f"no such directory: {directory}")
    raw_cfg = _json(directory / "config.json", MAX_CONFIG_BYTES)
    config = hf_config(raw_cfg)
    ids = token_ids(raw_cfg, config.vocab)
    check_tokenizer(directory)
    q = _Quantiser(quant)
    tensors = SafetensorsDir(directory)  # every header checked before any weight is read
    for name, shape in _expected(config).items():  # names and shapes, before heavy work
        found = tensors.entries.get(name)
        if found is None or found[1].shape != shape:
            got = "missing" if found is None else f"shape {found[1].shape}"
            raise HFFormatError(f"{name}: {got}, expected {shape}")
    # Gemma's RMSNorm scales by (1 + weight); the offset goes into the weights, as in GGUF.
    offset = np.float32(1.0 if config.arch in GEMMA else 0.0)
    d, f = config.head_dim, config.ffn
    q_out, kv_out = config.n_heads * d, config.n_kv_heads * d

    def block(i: int) -> LlamaBlock:
        raw = {role: tensors.get(*spec) for role, spec in _names(config, i).items()}
        if config.arch == "phi3":  # fused rows: Q, K, V and gate, up
            raw["wq"], raw["wk"], raw["wv"] = np.split(raw.pop("qkv"), [q_out, q_out + kv_out])
            raw["w_gate"], raw["w_up"] = np.split(raw.pop("gate_up"), [f])
        out: dict[str, Any] = {}
        for role, values in raw.items():
            if role.endswith("norm"):
                out[role] = q.vector(values + offset)
            elif role.startswith("b"):
                out[role] = q.vector(values)
            else:
                out[role] = q.matrix(np.ascontiguousarray(values))
        return LlamaBlock(**out)

    tied = bool(raw_cfg.get("tie_word_embeddings", False)) or not tensors.has("lm_head.weight")
    vocab_shape = (config.vocab, config.hidden)
    weights = LlamaWeights(
        config=config,
        token_embd=q.table(tensors.get("model.embed_tokens.weight", vocab_shape)),
        blocks=tuple(block(i) for i in range(config.n_layers)),
        output_norm=q.vector(tensors.get("model.norm.weight", (config.hidden,)) + offset),
        lm_head=None
        if tied or config.arch == "gemma2"
        else q.table(tensors.get("lm_head.weight", vocab_shape)),
    )
    return weights, ids, q.summary()
