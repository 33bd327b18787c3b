"""The on-disk model directory every importer writes and every runtime reads.

::

    model.onnx              decoder graph (small tensors inline, weights in the files below)
    model.onnx.<part>.data  external initializers by part (see ``weight_part``): embed,
                            block-000 .. block-<n-1>, final, lm_head, head, common
    genai_config.json       onnxruntime-genai configuration
    tokenizer.json          Hugging Face byte-level BPE tokenizer
    tokenizer_config.json   special tokens and chat template
    p2pedge_model.json      architecture facts (p2pedge.records.facts), so nothing needs to
                            parse ONNX

Writing is deterministic: the same weights give byte-identical files.
"""

from __future__ import annotations

import json
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
    as_attention,
    as_variant,
    build_decoder,
)
from p2pedge.models.convert.tokenizer import TokenizerSpec, write_tokenizer
from p2pedge.models.convert.weights import LlamaConfig, LlamaWeights
from p2pedge.records.facts import FACTS_FILE as FACTS_FILE
from p2pedge.records.facts import FORMAT_VERSION as FORMAT_VERSION
from p2pedge.records.facts import ModelFacts as ModelFacts
from p2pedge.records.facts import facts_dict as facts_dict
from p2pedge.records.facts import read_facts

MODEL_FILE = "model.onnx"
GENAI_CONFIG_FILE = "genai_config.json"
# Initializers at least this big go to external data files; smaller ones stay in the graph.
EXTERNAL_MIN_BYTES = 1024


TokenIds = tuple[int | None, int, int | None]  # bos, eos, pad


def token_ids(spec: TokenizerSpec) -> TokenIds:
    eos = spec.token_id(spec.eos_token)
    assert eos is not None
    return spec.token_id(spec.bos_token), eos, spec.token_id(spec.pad_token)


def model_facts(
    weights: LlamaWeights,
    ids: TokenIds,
    variant: Variant,
    int8: bool,
    attention: Attention = "gqa",
    int8_limbs: bool = False,
    quantization: str = "",
) -> ModelFacts:
    """The facts of a model built from ``weights`` with these choices."""
    c = weights.config
    bos, eos, pad = ids
    return ModelFacts(
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
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=pad,
        int8_activations=int8,
        attention=attention,
        int8_limbs=int8_limbs,
        quantization=quantization,
        rope_factors=c.rope_factors,
        activation=c.activation,
        embed_scale=c.embed_scale,
        attn_scale=c.attn_scale,
        attn_softcap=c.attn_softcap,
        final_softcap=c.final_softcap,
        sliding_window=c.sliding_window,
        swa_layers=c.swa_layers,
        rope_base_swa=c.rope_base_swa,
    )


def config_of(facts: ModelFacts) -> LlamaConfig:
    """The hyper-parameters recorded in ``facts`` (what a shard builder needs)."""
    return LlamaConfig(
        n_layers=facts.n_layers,
        hidden=facts.hidden,
        n_heads=facts.n_heads,
        n_kv_heads=facts.n_kv_heads,
        head_dim=facts.head_dim,
        ffn=facts.ffn,
        vocab=facts.vocab,
        rope_base=facts.rope_base,
        rms_eps=facts.rms_eps,
        context_length=facts.context_length,
        arch=facts.arch,
        rope_factors=tuple(facts.rope_factors),
        activation=facts.activation,
        embed_scale=facts.embed_scale,
        attn_scale=facts.attn_scale,
        attn_softcap=facts.attn_softcap,
        final_softcap=facts.final_softcap,
        sliding_window=facts.sliding_window,
        swa_layers=facts.swa_layers,
        rope_base_swa=facts.rope_base_swa,
    )


def read_model_facts(model_dir: Path) -> ModelFacts:
    """The checked facts of ``model_dir`` (see :func:`p2pedge.records.facts.read_facts`)."""
    return read_facts(model_dir / FACTS_FILE)


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


def write_model_files(
    out_dir: Path, weights: LlamaWeights, facts: ModelFacts, int8_limbs: bool = False
) -> None:
    """Build the decoder ``facts`` describe and write graph, genai config and facts."""
    attention = as_attention(facts.attention)
    variant = as_variant(facts.variant)
    model = build_decoder(weights, variant, facts.int8_activations, attention, int8_limbs)
    save_onnx(model, out_dir, by_part=True)
    write_json(out_dir / GENAI_CONFIG_FILE, genai_config(facts))
    write_json(out_dir / FACTS_FILE, facts_dict(facts))


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
    facts = model_facts(
        weights,
        token_ids(tokenizer),
        variant,
        int8_activations,
        attention,
        int8_limbs,
        quantization,
    )
    write_model_files(out_dir, weights, facts, int8_limbs)
    write_tokenizer(out_dir, tokenizer)
    return out_dir
