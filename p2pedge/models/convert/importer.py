"""GGUF file or Hugging Face directory -> p2pedge model directory (ONNX decoder, genai
config, tokenizer).

The directory is written next to its destination and renamed into place only when every
file is there, so a crash or Ctrl-C never leaves a half-written model that looks complete.
"""

from __future__ import annotations

import os
import shutil
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from p2pedge.errors import ConfigError
from p2pedge.models.convert.gguf_reader import (
    GGUFFormatError,
    TokenizerFacts,
    read_gguf,
    read_tensor_infos,
)
from p2pedge.models.convert.layout import write_model_dir
from p2pedge.models.convert.onnx_graph import VARIANTS, Variant
from p2pedge.models.convert.quants import TensorInfo
from p2pedge.models.convert.tokenizer import PreTokenizer, TokenizerSpec, spm_merges

# llama.cpp names the pre-tokenizer; these are the ones the tokenizer writer can express.
_PRE_TOKENIZERS: dict[str, PreTokenizer] = {
    "smollm": "smollm",
    "gpt2": "gpt2",
    "default": "gpt2",
    "llama-bpe": "llama3",
    "qwen2": "qwen2",
}
TOKENIZER_MODELS = ("gpt2", "llama")  # byte-level BPE, SentencePiece


def tokenizer_spec(facts: TokenizerFacts) -> TokenizerSpec:
    """Translate the GGUF's tokenizer facts into the tokenizer writer's spec."""
    if facts.model not in TOKENIZER_MODELS:
        raise GGUFFormatError(
            f"tokenizer model {facts.model!r} unsupported (only {TOKENIZER_MODELS})",
            key="tokenizer.ggml.model",
        )

    def token(tid: int | None) -> str | None:
        return None if tid is None else facts.tokens[tid]

    eos = token(facts.eos_id)
    if eos is None:
        raise GGUFFormatError("the GGUF names no end-of-sequence token")
    if facts.model == "llama":
        if not facts.scores:
            raise GGUFFormatError("a SentencePiece vocabulary needs token scores")
        return TokenizerSpec(
            tokens=facts.tokens,
            merges=spm_merges(facts.tokens, facts.scores),
            special_tokens=tuple(facts.tokens[i] for i in facts.special_ids),
            eos_token=eos,
            bos_token=token(facts.bos_id),
            pad_token=token(facts.pad_id),
            unk_token=token(facts.unk_id) or facts.tokens[0],
            chat_template=facts.chat_template,
            pre_tokenizer="spm",
            add_bos=facts.add_bos,
        )
    pre = _PRE_TOKENIZERS.get(facts.pre)
    if pre is None:
        raise GGUFFormatError(f"pre-tokenizer {facts.pre!r} unsupported", key="tokenizer.ggml.pre")
    return TokenizerSpec(
        tokens=facts.tokens,
        merges=facts.merges,
        special_tokens=tuple(facts.tokens[i] for i in facts.special_ids),
        eos_token=eos,
        bos_token=token(facts.bos_id),
        pad_token=token(facts.pad_id),
        unk_token=None,  # byte-level BPE covers every byte; an unk would only hide bugs
        chat_template=facts.chat_template,
        pre_tokenizer=pre,
        add_bos=facts.add_bos,
    )


def quantization_summary(infos: list[TensorInfo]) -> str:
    """``"Q4_K:98,Q6_K:14,F32:61"``: tensor types by count, most common first."""
    counts = Counter(info.qtype for info in infos)
    return ",".join(f"{kind}:{n}" for kind, n in counts.most_common())


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.2f} MiB"


def import_gguf(
    gguf_path: str | Path,
    out_dir: str | Path,
    name: str,
    variant: Variant = "lossless4",
    int8_activations: bool = True,
    int8_limbs: bool = False,
    report: Callable[[str], None] | None = None,
) -> Path:
    """Import ``gguf_path`` into the model directory ``out_dir`` (replaced if present).

    ``name`` is the model's registry name, used in messages only; ``int8_activations`` picks
    MatMulNBits accuracy level 4 for the lossless 4-bit variant and is ignored for fp32;
    ``int8_limbs`` (lossless4 without int8 activations) keeps fp32-exact activations but
    runs them through the int8 kernel as three exact limbs. ``report`` receives one line
    per tensor (type, shape, bytes in the file), then the written directory's size.
    Every tensor type is checked before any weight is read.
    Raises GGUFFormatError (a ModelLoadError) for a bad file, ConfigError for bad arguments.
    """
    _check_args(name, variant, int8_limbs, int8_activations)
    out = Path(out_dir)
    infos = read_tensor_infos(gguf_path)  # refuses unsupported types before heavy work
    if report is not None:
        for info in infos:
            shape = "x".join(str(d) for d in info.shape)
            report(f"  {info.name:<32} {info.qtype:<5} {shape:>12} {_mib(info.nbytes):>12}")
    weights, facts = read_gguf(gguf_path)
    spec = tokenizer_spec(facts)
    int8 = int8_activations and variant == "lossless4"
    summary = quantization_summary(infos)

    def write(staging: Path) -> None:
        write_model_dir(
            staging, weights, spec, variant, int8, int8_limbs=int8_limbs, quantization=summary
        )

    return _write_staged(out, write, Path(gguf_path), f"types {summary}", variant, report)


def _write_staged(
    out: Path,
    write: Callable[[Path], None],
    source: Path,
    what: str,
    variant: str,
    report: Callable[[str], None] | None,
) -> Path:
    """Run ``write`` into a staging directory next to ``out``, then swap it into place."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        write(staging)
        if report is not None:
            written = sum(f.stat().st_size for f in staging.iterdir())
            files = source.glob("*.safetensors") if source.is_dir() else [source]
            label = "safetensors" if source.is_dir() else "GGUF"
            size = sum(f.stat().st_size for f in files)
            report(
                f"{what}; {label} {_mib(size)} -> {variant} directory {_mib(written)} "
                f"({written / max(size, 1):.2f}x)"
            )
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


def _check_args(name: str, variant: str, int8_limbs: bool, int8_activations: bool) -> None:
    if variant not in VARIANTS:
        raise ConfigError(f"variant {variant!r} is not one of {VARIANTS}")
    if int8_limbs and (variant != "lossless4" or int8_activations):
        raise ConfigError("int8 limbs need the lossless4 variant with fp32 activations")
    if not name or "/" in name or "\\" in name or name.startswith("."):
        raise ConfigError(f"model name {name!r} must be a plain, non-hidden name")


def import_hf(
    hf_dir: str | Path,
    out_dir: str | Path,
    name: str,
    quant: str = "Q4_1",
    variant: Variant = "lossless4",
    int8_activations: bool = True,
    report: Callable[[str], None] | None = None,
) -> Path:
    """Import a Hugging Face directory into the model directory ``out_dir``.

    ``quant`` (``hf_reader.QUANTS``) quantises the block matrices into that GGUF block type
    (the embedding to Q8_0), or keeps them ``F16``/``F32``; then as :func:`import_gguf`.
    ``tokenizer.json`` and ``tokenizer_config.json`` are copied as they are.
    """
    from p2pedge.models.convert.hf_reader import TOKENIZER_FILES, read_hf
    from p2pedge.models.convert.layout import model_facts, write_model_files

    _check_args(name, variant, False, int8_activations)
    source = Path(hf_dir)
    weights, ids, summary = read_hf(source, quant)
    int8 = int8_activations and variant == "lossless4"
    facts = model_facts(weights, (ids.bos, ids.eos, ids.pad), variant, int8, quantization=summary)
    if report is not None:
        c = weights.config
        report(f"  {c.arch}: {c.n_layers} blocks, hidden {c.hidden}, vocab {c.vocab}")

    def write(staging: Path) -> None:
        write_model_files(staging, weights, facts)
        for file in TOKENIZER_FILES:
            if (source / file).is_file():
                shutil.copyfile(source / file, staging / file)

    return _write_staged(Path(out_dir), write, source, f"types {summary}", variant, report)
