"""Random-weight Hugging Face model directories, and their GGUF conversion, for tests.

:func:`write_synthetic_hf` writes what ``save_pretrained`` writes for the ``llama``,
``mistral``, ``qwen2``, ``qwen3``, ``phi3``, ``gemma2`` and ``gemma3_text`` families:
``config.json``, weights as BF16, F16 or F32 ``*.safetensors`` (one file, or two shards
with ``model.safetensors.index.json``) under the Hugging Face tensor names, and a
byte-level BPE ``tokenizer.json`` with its ``tokenizer_config.json``. :func:`hf_to_gguf`
converts such a directory the way llama.cpp's ``convert_hf_to_gguf.py`` does (GGUF names,
Q/K rows permuted into llama.cpp's interleaved rotary layout for ``llama``, Llama 3 rope
scaling as ``rope_freqs``, fused phi3 tensors kept fused, Gemma's norm offset added, dtypes
kept), so a test can hold the two importers to the same logits. Tiny by default.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import gguf
import numpy as np
import numpy.typing as npt

from p2pedge.models.convert.tokenizer import (
    TokenizerSpec,
    byte_to_unicode,
    learn_merges,
    write_tokenizer,
)
from p2pedge.testing.synthetic_gguf import SyntheticShape

Family = Literal["llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3_text"]
GEMMA = ("gemma2", "gemma3_text")
Dtype = Literal["BF16", "F16", "F32"]
_CORPUS = "The quick brown fox jumps over the lazy dog. What is the capital of France? Paris. "
LLAMA3_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
}


@dataclass(frozen=True)
class HFSpec:
    family: Family = "llama"
    dtype: Dtype = "BF16"
    shape: SyntheticShape = field(default_factory=SyntheticShape)
    tied: bool = True
    sharded: bool = False  # two safetensors files and an index
    llama3_rope: bool = False  # Llama 3.1-style rope_scaling
    seed: int = 0


def tokenizer_spec() -> TokenizerSpec:
    alphabet = [byte_to_unicode()[b] for b in range(256)]
    merges = learn_merges(_CORPUS, 48, "smollm")
    tokens = list(alphabet)
    for merge in merges:
        joined = merge.replace(" ", "")
        if joined not in tokens:
            tokens.append(joined)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    return TokenizerSpec(
        tokens=tuple(tokens + specials),
        merges=tuple(merges),
        special_tokens=tuple(specials),
        eos_token="<|im_end|>",
        bos_token="<|im_start|>",
    )


def _as_dtype(values: npt.NDArray[np.float32], dtype: Dtype) -> tuple[bytes, str]:
    if dtype == "F32":
        return values.astype("<f4").tobytes(), "F32"
    if dtype == "F16":
        return values.astype("<f2").tobytes(), "F16"
    bits = values.astype(np.float32).view(np.uint32)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype("<u2")  # nearest even
    return rounded.tobytes(), "BF16"


def write_safetensors(path: Path, tensors: dict[str, tuple[bytes, str, tuple[int, ...]]]) -> None:
    """The safetensors layout: u64 header length, JSON header (space-padded to 8 bytes),
    then each tensor's bytes in header order."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, (data, dtype, shape) in tensors.items():
        header[name] = {
            "dtype": dtype,
            "shape": list(shape),
            "data_offsets": [offset, offset + len(data)],
        }
        offset += len(data)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for data, _, _ in tensors.values():
            f.write(data)


def hf_weights(spec: HFSpec, vocab: int) -> dict[str, npt.NDArray[np.float32]]:
    """Random float32 weights under Hugging Face names (values exact in ``spec.dtype``)."""
    s, rng = spec.shape, np.random.default_rng(spec.seed)
    hd = s.hidden // s.n_heads
    q_out, kv_out = s.n_heads * hd, s.n_kv_heads * hd

    def mat(out: int, inp: int, gain: float = 1.0) -> npt.NDArray[np.float32]:
        return (gain / math.sqrt(inp) * rng.standard_normal((out, inp))).astype(np.float32)

    def vec(n: int, mean: float = 1.0, std: float = 0.1) -> npt.NDArray[np.float32]:
        return (mean + std * rng.standard_normal(n)).astype(np.float32)

    gemma = spec.family in GEMMA
    # Gemma: norms stored without their +1; embedding and final norm sized as in
    # synthetic_gguf so blocks, not the scaled embedding, decide the logits.
    shift = -1.0 if gemma else 0.0
    embd_std = 0.3 / math.sqrt(s.hidden) if gemma else 0.3
    embd = embd_std * rng.standard_normal((vocab, s.hidden))
    out = {"model.embed_tokens.weight": embd.astype(np.float32)}
    for i in range(s.n_layers):
        p, a = f"model.layers.{i}.", f"model.layers.{i}.self_attn."
        out[p + "input_layernorm.weight"] = vec(s.hidden, 1.0 + shift)
        q, k, v = mat(q_out, s.hidden, 2.0), mat(kv_out, s.hidden, 2.0), mat(kv_out, s.hidden)
        if spec.family == "phi3":
            out[a + "qkv_proj.weight"] = np.concatenate([q, k, v])
        else:
            out[a + "q_proj.weight"], out[a + "k_proj.weight"], out[a + "v_proj.weight"] = q, k, v
        out[a + "o_proj.weight"] = mat(s.hidden, q_out, 2.0)
        if spec.family == "qwen2":
            for name, n in (("q", q_out), ("k", kv_out), ("v", kv_out)):
                out[a + f"{name}_proj.bias"] = vec(n, 0.0, 0.5)
        if spec.family in ("qwen3", "gemma3_text"):
            out[a + "q_norm.weight"] = vec(hd, 1.0 + shift)
            out[a + "k_norm.weight"] = vec(hd, 1.0 + shift)
        if gemma:
            out[p + "post_attention_layernorm.weight"] = vec(s.hidden, 4.0 + shift, 0.4)
            out[p + "pre_feedforward_layernorm.weight"] = vec(s.hidden, 1.0 + shift)
            out[p + "post_feedforward_layernorm.weight"] = vec(s.hidden, 4.0 + shift, 0.4)
        else:
            out[p + "post_attention_layernorm.weight"] = vec(s.hidden)
        gate, up = mat(s.ffn, s.hidden), mat(s.ffn, s.hidden)
        if spec.family == "phi3":
            out[p + "mlp.gate_up_proj.weight"] = np.concatenate([gate, up])
        else:
            out[p + "mlp.gate_proj.weight"], out[p + "mlp.up_proj.weight"] = gate, up
        out[p + "mlp.down_proj.weight"] = mat(s.hidden, s.ffn, 2.0)
    out["model.norm.weight"] = vec(s.hidden, math.sqrt(s.hidden) + shift if gemma else 1.0)
    if not spec.tied:
        out["lm_head.weight"] = mat(vocab, s.hidden)
    return out


def write_synthetic_hf(directory: Path, spec: HFSpec = HFSpec()) -> Path:
    """Write a random-weight Hugging Face directory for ``spec``."""
    s = spec.shape
    directory.mkdir(parents=True, exist_ok=True)
    tok = tokenizer_spec()
    write_tokenizer(directory, tok)
    vocab = len(tok.tokens)
    config: dict[str, Any] = {
        "architectures": [{"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                           "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                           "phi3": "Phi3ForCausalLM", "gemma2": "Gemma2ForCausalLM",
                           "gemma3_text": "Gemma3ForCausalLM"}[spec.family]],
        "model_type": spec.family,
        "hidden_size": s.hidden,
        "intermediate_size": s.ffn,
        "num_hidden_layers": s.n_layers,
        "num_attention_heads": s.n_heads,
        "num_key_value_heads": s.n_kv_heads,
        "head_dim": s.hidden // s.n_heads,
        "max_position_embeddings": s.context_length,
        "rms_norm_eps": s.rms_eps,
        "rope_theta": s.rope_base,
        "rope_scaling": dict(LLAMA3_SCALING) if spec.llama3_rope else None,
        "vocab_size": vocab,
        "hidden_act": "silu",
        "tie_word_embeddings": spec.tied,
        "bos_token_id": tok.token_id(tok.bos_token),
        "eos_token_id": [tok.token_id(tok.eos_token), tok.token_id("<|endoftext|>")],
        "torch_dtype": {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}[spec.dtype],
    }  # fmt: skip
    if spec.family in GEMMA:  # Gemma 2: alternating windows; Gemma 3: 5 local to 1 global
        config |= {
            "hidden_activation": "gelu_pytorch_tanh",
            "hidden_act": "gelu_pytorch_tanh",
            "query_pre_attn_scalar": s.hidden // s.n_heads,
            "sliding_window": 8,
            "tie_word_embeddings": True,
        }
        if spec.family == "gemma2":
            config |= {"attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0}
        else:
            config |= {"rope_theta": s.rope_base * 100, "rope_local_base_freq": s.rope_base}
            config |= {"sliding_window_pattern": 6, "final_logit_softcapping": None}
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    tensors = {
        name: (*_as_dtype(values, spec.dtype), values.shape)
        for name, values in hf_weights(spec, vocab).items()
    }
    names = list(tensors)
    parts = [names[: len(names) // 2], names[len(names) // 2 :]] if spec.sharded else [names]
    weight_map: dict[str, str] = {}
    for j, part in enumerate(parts):
        file = (
            f"model-{j + 1:05d}-of-{len(parts):05d}.safetensors"
            if spec.sharded
            else "model.safetensors"
        )
        write_safetensors(directory / file, {n: tensors[n] for n in part})
        weight_map |= dict.fromkeys(part, file)
    if spec.sharded:
        index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
        (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    return directory


# -- the GGUF conversion, as llama.cpp's convert_hf_to_gguf.py does it ------------------

_GGUF_NAMES = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


_PHI3_NAMES = {"self_attn.qkv_proj": "attn_qkv", "mlp.gate_up_proj": "ffn_up"}
_GEMMA_NAMES = {
    "post_attention_layernorm": "post_attention_norm",
    "pre_feedforward_layernorm": "ffn_norm",
    "post_feedforward_layernorm": "post_ffw_norm",
}
_TOP_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}


def _read_all(directory: Path) -> dict[str, tuple[npt.NDArray[Any], str]]:
    """Every tensor with its stored dtype (BF16 as raw uint16), read independently of
    the importer's reader."""
    out: dict[str, tuple[npt.NDArray[Any], str]] = {}
    for path in sorted(directory.glob("*.safetensors")):
        data = path.read_bytes()
        (n,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8 : 8 + n])
        for name, e in header.items():
            if name == "__metadata__":
                continue
            begin, end = e["data_offsets"]
            np_dtype = {"F32": "<f4", "F16": "<f2", "BF16": "<u2"}[e["dtype"]]
            raw = np.frombuffer(data[8 + n + begin : 8 + n + end], dtype=np_dtype)
            out[name] = (raw.reshape(e["shape"]), e["dtype"])
    return out


def _permute(w: npt.NDArray[Any], n_head: int) -> npt.NDArray[Any]:
    """llama.cpp's ``LlamaModel.permute``: rotate-half rows -> interleaved pairs."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def hf_to_gguf(directory: Path, path: Path) -> Path:
    """Convert a directory from :func:`write_synthetic_hf` into a GGUF file."""
    cfg = json.loads((directory / "config.json").read_text())
    family = cfg["model_type"]
    arch = {"mistral": "llama", "gemma3_text": "gemma3"}.get(family, family)
    gemma = family in GEMMA
    tok = json.loads((directory / "tokenizer.json").read_text())
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_rope_freq_base(cfg["rope_theta"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    if arch == "phi3":
        w.add_rope_dimension_count(cfg["head_dim"])
    if gemma:
        w.add_sliding_window(cfg["sliding_window"])
    if arch == "gemma2":
        w.add_attn_logit_softcapping(cfg["attn_logit_softcapping"])
        w.add_final_logit_softcapping(cfg["final_logit_softcapping"])
    if arch == "gemma3":
        w.add_rope_freq_base_swa(cfg["rope_local_base_freq"])
    by_id = {i: t for t, i in tok["model"]["vocab"].items()}
    added = {t["content"]: t["id"] for t in tok["added_tokens"]}
    by_id |= {i: t for t, i in added.items()}
    tokens = [by_id[i] for i in range(len(by_id))]
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in added else 1 for t in tokens])
    merges = tok["model"]["merges"]
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    w.add_bos_token_id(cfg["bos_token_id"])
    w.add_eos_token_id(cfg["eos_token_id"][0])
    n_head, n_kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    head_dim = cfg["head_dim"]
    for name, (raw, dtype) in _read_all(directory).items():
        if name.startswith("model.layers."):
            _, _, i, rest = name.split(".", 3)
            stem, kind = rest.rsplit(".", 1)
            names = _GEMMA_NAMES if gemma else _PHI3_NAMES if arch == "phi3" else {}
            new = f"blk.{i}.{names.get(stem) or _GGUF_NAMES[stem]}.{kind}"
        else:
            new = _TOP_NAMES[name]
        if arch == "llama" and new.endswith(("attn_q.weight", "attn_k.weight")):
            raw = _permute(raw, n_head if "attn_q" in new else n_kv)
        if raw.ndim == 1:  # llama.cpp keeps norms and biases in F32
            values = (raw.astype(np.uint32) << 16).view(np.float32) if dtype == "BF16" else raw
            values = values.astype(np.float32)
            if gemma and new.endswith("norm.weight"):
                # Gemma's +1 (llama.cpp adds it in the checkpoint's dtype; in float32 here,
                # as Hugging Face's RMSNorm computes it, so the two imports compare exactly)
                values = values + np.float32(1.0)
            w.add_tensor(new, np.ascontiguousarray(values, dtype=np.float32))
        elif dtype == "BF16":
            w.add_tensor(
                new,
                np.ascontiguousarray(raw).view(np.uint8),
                raw_dtype=gguf.GGMLQuantizationType.BF16,
            )
        else:
            w.add_tensor(new, np.ascontiguousarray(raw))
    scaling = cfg.get("rope_scaling")
    if scaling:  # LlamaModel.generate_extra_tensors
        base, factor = cfg["rope_theta"], scaling["factor"]
        low_wl = scaling["original_max_position_embeddings"] / scaling["low_freq_factor"]
        high_wl = scaling["original_max_position_embeddings"] / scaling["high_freq_factor"]
        factors = []
        for freq in 1.0 / base ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim):
            wavelen = 2 * math.pi / freq
            if wavelen < high_wl:
                factors.append(1.0)
            elif wavelen > low_wl:
                factors.append(factor)
            else:
                smooth = (
                    scaling["original_max_position_embeddings"] / wavelen
                    - scaling["low_freq_factor"]
                ) / (scaling["high_freq_factor"] - scaling["low_freq_factor"])
                factors.append(1 / ((1 - smooth) / factor + smooth))
        w.add_tensor("rope_freqs.weight", np.array(factors, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
