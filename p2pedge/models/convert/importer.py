"""GGUF file -> p2pedge model directory (ONNX decoder, genai config, tokenizer).

The directory is written next to its destination and renamed into place only when every
file is there, so a crash or Ctrl-C never leaves a half-written model that looks complete.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from p2pedge.errors import ConfigError
from p2pedge.models.convert.gguf_reader import GGUFFormatError, TokenizerFacts, read_gguf
from p2pedge.models.convert.layout import write_model_dir
from p2pedge.models.convert.onnx_graph import VARIANTS, Variant
from p2pedge.models.convert.tokenizer import TokenizerSpec

# llama.cpp names the pre-tokenizer; these are the ones the tokenizer writer can express.
_PRE_TOKENIZERS = {"smollm": "smollm", "gpt2": "gpt2", "default": "gpt2"}


def tokenizer_spec(facts: TokenizerFacts) -> TokenizerSpec:
    """Translate the GGUF's tokenizer facts into the tokenizer writer's spec."""
    if facts.model != "gpt2":
        raise GGUFFormatError(f"tokenizer model {facts.model!r} unsupported (only byte-level BPE)")
    pre = _PRE_TOKENIZERS.get(facts.pre)
    if pre is None:
        raise GGUFFormatError(f"pre-tokenizer {facts.pre!r} unsupported")

    def token(tid: int | None) -> str | None:
        return None if tid is None else facts.tokens[tid]

    eos = token(facts.eos_id)
    if eos is None:
        raise GGUFFormatError("the GGUF names no end-of-sequence token")
    return TokenizerSpec(
        tokens=facts.tokens,
        merges=facts.merges,
        special_tokens=tuple(facts.tokens[i] for i in facts.special_ids),
        eos_token=eos,
        bos_token=token(facts.bos_id),
        pad_token=token(facts.pad_id),
        unk_token=None,  # byte-level BPE covers every byte; an unk would only hide bugs
        chat_template=facts.chat_template,
        pre_tokenizer="smollm" if pre == "smollm" else "gpt2",
    )


def import_gguf(
    gguf_path: str | Path,
    out_dir: str | Path,
    name: str,
    variant: Variant = "lossless4",
    int8_activations: bool = True,
    int8_limbs: bool = False,
) -> Path:
    """Import ``gguf_path`` into the model directory ``out_dir`` (replaced if present).

    ``name`` is the model's registry name, used in messages only; ``int8_activations`` picks
    MatMulNBits accuracy level 4 for the lossless 4-bit variant and is ignored for fp32;
    ``int8_limbs`` (lossless4 without int8 activations) keeps fp32-exact activations but
    runs them through the int8 kernel as three exact limbs.
    Raises GGUFFormatError (a ModelLoadError) for a bad file, ConfigError for bad arguments.
    """
    if variant not in VARIANTS:
        raise ConfigError(f"variant {variant!r} is not one of {VARIANTS}")
    if int8_limbs and (variant != "lossless4" or int8_activations):
        raise ConfigError("int8 limbs need the lossless4 variant with fp32 activations")
    if not name or "/" in name or "\\" in name or name.startswith("."):
        raise ConfigError(f"model name {name!r} must be a plain, non-hidden name")
    out = Path(out_dir)
    weights, facts = read_gguf(gguf_path)
    spec = tokenizer_spec(facts)
    int8 = int8_activations and variant == "lossless4"
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        write_model_dir(staging, weights, spec, variant, int8, int8_limbs=int8_limbs)
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
            staging.rename(out)
            shutil.rmtree(old)
        else:
            staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out
