"""The on-disk model directory every importer writes and every runtime reads.

::

    model.onnx              decoder graph (small tensors inline, weights in the files below)
    model.onnx.<part>.data  external initializers by part (see ``weight_part``): embed,
                            block-000 .. block-<n-1>, final, lm_head, head, common
    genai_config.json       onnxruntime-genai configuration
    tokenizer.json          Hugging Face byte-level BPE tokenizer
    tokenizer_config.json   special tokens and chat template
    p2pedge_model.json      architecture facts (ModelFacts), so nothing needs to parse ONNX

Writing is deterministic: the same weights give byte-identical files.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import onnx
from onnx.external_data_helper import set_external_data

from p2pedge.models.convert.onnx_graph import (
    ATTENTION_MASK,
    INPUT_IDS,
    LOGITS,
    POSITION_IDS,
    Attention,
    Variant,
    build_decoder,
)
from p2pedge.models.convert.tokenizer import TokenizerSpec, write_tokenizer
from p2pedge.models.convert.weights import LlamaWeights

MODEL_FILE = "model.onnx"
FACTS_FILE = "p2pedge_model.json"
GENAI_CONFIG_FILE = "genai_config.json"
# Bumped whenever the graph layout or its runtime config changes, so a split never mixes
# builder versions and `make model` re-imports (4: genai shares the KV buffer; 5: the exact
# fp32-activation head is the Q8_0 table as two 4-bit halves; 6: weights in one file per
# part, so a shard server fetches only its blocks' bytes).
FORMAT_VERSION = 6
# Initializers at least this big go to external data files; smaller ones stay in the graph.
EXTERNAL_MIN_BYTES = 1024


@dataclass(frozen=True)
class ModelFacts:
    """Contents of ``p2pedge_model.json``."""

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

    @classmethod
    def of(
        cls,
        weights: LlamaWeights,
        spec: TokenizerSpec,
        variant: Variant,
        int8: bool,
        attention: Attention = "gqa",
        int8_limbs: bool = False,
        quantization: str = "",
    ) -> ModelFacts:
        c = weights.config
        eos = spec.token_id(spec.eos_token)
        assert eos is not None
        return cls(
            arch=c.arch,
            n_layers=c.n_layers,
            hidden=c.hidden,
            n_heads=c.n_heads,
            n_kv_heads=c.n_kv_heads,
            head_dim=c.head_dim,
            ffn=c.ffn,
            vocab=c.vocab,
            rope_base=float(c.rope_base),
            rms_eps=float(c.rms_eps),
            context_length=c.context_length,
            variant=variant,
            bos_token_id=spec.token_id(spec.bos_token),
            eos_token_id=eos,
            pad_token_id=spec.token_id(spec.pad_token),
            int8_activations=int8,
            attention=attention,
            int8_limbs=int8_limbs,
            quantization=quantization,
            rope_factors=c.rope_factors,
        )


def read_model_facts(model_dir: Path) -> ModelFacts:
    data = json.loads((model_dir / FACTS_FILE).read_text(encoding="utf-8"))
    data["rope_factors"] = tuple(float(f) for f in data.get("rope_factors", ()))
    return ModelFacts(**data)


def weight_part(name: str) -> str:
    """Which data file of a model directory holds initializer ``name``.

    One file per transformer block (``block-007``), the embedding table (``embed``), the
    final norm (``final``), an untied LM head's table (``lm_head``), the tables the full
    model's head derives from a Q8_0 table (``head``: a shard rebuilds them from the
    table), and the rest (``common``: rotary caches). A shard needs only some of them.
    """
    if name.startswith("layers."):
        return f"block-{int(name.split('.', 2)[1]):03d}"
    if ".head_" in name:
        return "head"
    if name.startswith("model.embed_tokens."):
        return "embed"
    if name.startswith("lm_head."):
        return "lm_head"
    if name == "final_norm":
        return "final"
    return "common"


def part_file(part: str, filename: str = MODEL_FILE) -> str:
    return f"{filename}.{part}.data"


def save_onnx(
    model: onnx.ModelProto, out_dir: Path, filename: str = MODEL_FILE, *, by_part: bool = False
) -> Path:
    """Save with the initializers in ``<filename>.data`` next to the graph, or with
    ``by_part`` in one file per :func:`weight_part` (a model directory that is published,
    so that pulling one shard's weights means pulling only some files)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / filename
    for stale in out_dir.glob(f"{filename}*.data"):
        stale.unlink()  # onnx appends to an existing data file
    if not by_part:
        onnx.save_model(
            model,
            str(path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=f"{filename}.data",
            size_threshold=EXTERNAL_MIN_BYTES,
        )
        return path
    for tensor in model.graph.initializer:
        if tensor.HasField("raw_data") and len(tensor.raw_data) >= EXTERNAL_MIN_BYTES:
            set_external_data(tensor, part_file(weight_part(tensor.name), filename))
    onnx.save_model(model, str(path))  # writes each marked tensor to its file
    return path


def genai_config(facts: ModelFacts, filename: str = MODEL_FILE) -> dict[str, Any]:
    pad = facts.pad_token_id if facts.pad_token_id is not None else facts.eos_token_id
    return {
        "model": {
            "bos_token_id": facts.bos_token_id if facts.bos_token_id is not None else pad,
            "context_length": facts.context_length,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": filename,
                "head_size": facts.head_dim,
                "hidden_size": facts.hidden,
                "inputs": {
                    "input_ids": INPUT_IDS,
                    "attention_mask": ATTENTION_MASK,
                    "position_ids": POSITION_IDS,
                    "past_key_names": "past_key_values.%d.key",
                    "past_value_names": "past_key_values.%d.value",
                },
                "outputs": {
                    "logits": LOGITS,
                    "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value",
                },
                "num_attention_heads": facts.n_heads,
                "num_hidden_layers": facts.n_layers,
                "num_key_value_heads": facts.n_kv_heads,
            },
            "eos_token_id": facts.eos_token_id,
            "pad_token_id": pad,
            "type": "llama",
            "vocab_size": facts.vocab,
        },
        "search": {
            "diversity_penalty": 0.0,
            "do_sample": False,
            "early_stopping": True,
            "length_penalty": 1.0,
            "max_length": facts.context_length,
            "min_length": 0,
            "no_repeat_ngram_size": 0,
            "num_beams": 1,
            "num_return_sequences": 1,
            # GroupQueryAttention writes new keys/values in place into a buffer sized for the
            # whole generation; the plain-ops graph concatenates and cannot share it.
            "past_present_share_buffer": facts.attention == "gqa",
            "repetition_penalty": 1.0,
            "temperature": 1.0,
            "top_k": 1,
            "top_p": 1.0,
        },
    }


def write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def write_model_dir(
    out_dir: Path,
    weights: LlamaWeights,
    tokenizer: TokenizerSpec,
    variant: Variant = "lossless4",
    int8_activations: bool = False,
    attention: Attention = "gqa",
    int8_limbs: bool = False,
    quantization: str = "",
) -> Path:
    """Build the decoder for ``variant`` and write the whole model directory."""
    facts = ModelFacts.of(
        weights, tokenizer, variant, int8_activations, attention, int8_limbs, quantization
    )
    model = build_decoder(weights, variant, int8_activations, attention, int8_limbs)
    save_onnx(model, out_dir, by_part=True)
    write_json(out_dir / GENAI_CONFIG_FILE, genai_config(facts))
    write_tokenizer(out_dir, tokenizer)
    write_json(out_dir / FACTS_FILE, asdict(facts))
    return out_dir
