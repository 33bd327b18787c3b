"""Writes ``tokenizer.json`` / ``tokenizer_config.json`` for a GGUF vocabulary.

Both Hugging Face ``tokenizers`` and onnxruntime-genai's ``og.Tokenizer`` read these files.
Byte-level BPE (GGUF ``gpt2``): the token list and merges (already in the GPT-2
byte-to-unicode alphabet) are written as they are; only the pre-tokenizer has to be named
(``smollm``, ``gpt2``, Llama 3's ``llama3`` and ``qwen2`` regexes). SentencePiece (GGUF
``llama``: Llama 2, Mistral, TinyLlama) is written as Hugging Face writes those models: a
BPE with byte fallback over ``▁`` pieces whose merges come from the pieces' scores
(:func:`spm_merges`), a normaliser that prefixes and replaces spaces with ``▁``.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

PreTokenizer = Literal["smollm", "gpt2", "llama3", "qwen2", "spm"]
SPM_SPACE = "\u2581"
# llama.cpp's LLAMA3 and QWEN2 pre-tokenizer regexes (they differ in digit runs).
_LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_REGEX = _LLAMA3_REGEX.replace(r"\p{N}{1,3}", r"\p{N}")

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@dataclass(frozen=True)
class TokenizerSpec:
    """A byte-level BPE vocabulary: ``tokens[i]`` is token id ``i``."""

    tokens: tuple[str, ...]
    merges: tuple[str, ...]  # "left right", in priority order
    special_tokens: tuple[str, ...]  # control tokens, matched before pre-tokenization
    eos_token: str
    bos_token: str | None = None
    pad_token: str | None = None
    unk_token: str | None = None
    chat_template: str | None = CHATML_TEMPLATE
    pre_tokenizer: PreTokenizer = "smollm"  # "spm": SentencePiece with byte fallback
    model_max_length: int = 2048
    add_bos: bool = False

    def token_id(self, token: str | None) -> int | None:
        return None if token is None else self.tokens.index(token)


def byte_to_unicode() -> dict[int, str]:
    """The GPT-2 reversible byte -> printable-character map used by ByteLevel."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars, strict=True)}


def _pre_tokenizer(kind: PreTokenizer) -> pre_tokenizers.PreTokenizer:
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if kind == "smollm":
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    if kind == "gpt2":
        return byte_level
    if kind in ("llama3", "qwen2"):
        regex = Regex(_LLAMA3_REGEX if kind == "llama3" else _QWEN2_REGEX)
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(regex, behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    raise ValueError(f"unknown pre-tokenizer {kind!r}")


def spm_merges(tokens: Sequence[str], scores: Sequence[float]) -> tuple[str, ...]:
    """BPE merges equivalent to SentencePiece's greedy highest-score merging.

    Every split ``left + right`` of a normal piece into two pieces is a merge, ranked by
    the merged piece's score (highest first), then by the halves' ids, as Hugging Face's
    converter does: BPE then merges the pair whose union scores highest, like llama.cpp.
    Byte tokens (``<0xXX>``) and controls take no part.
    """
    ids = {t: i for i, t in enumerate(tokens)}
    found: list[tuple[float, int, int, str]] = []
    for piece, pid in ids.items():
        if piece.startswith("<") and piece.endswith(">"):
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in ids and right in ids:
                found.append((-scores[pid], ids[left], ids[right], f"{left} {right}"))
    found.sort()
    return tuple(merge for *_, merge in found)


def _build_spm(
    spec: TokenizerSpec, vocab: dict[str, int], merges: list[tuple[str, str]]
) -> Tokenizer:
    tok = Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=merges,
            unk_token=spec.unk_token,
            fuse_unk=True,
            byte_fallback=True,
        )
    )
    tok.normalizer = normalizers.Sequence(
        [normalizers.Prepend(SPM_SPACE), normalizers.Replace(" ", SPM_SPACE)]
    )
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace(SPM_SPACE, " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    return tok


def build_tokenizer(spec: TokenizerSpec) -> Tokenizer:
    vocab = {tok: i for i, tok in enumerate(spec.tokens)}
    if len(vocab) != len(spec.tokens):
        raise ValueError("duplicate tokens in vocabulary")
    merges = []
    for line in spec.merges:
        left, sep, right = line.partition(" ")
        if not sep:
            raise ValueError(f"malformed merge {line!r}")
        merges.append((left, right))
    if spec.pre_tokenizer == "spm":
        tok = _build_spm(spec, vocab, merges)
    else:
        tok = Tokenizer(
            models.BPE(vocab=vocab, merges=merges, unk_token=spec.unk_token, fuse_unk=False)
        )
        tok.pre_tokenizer = _pre_tokenizer(spec.pre_tokenizer)
        tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in spec.special_tokens]
    )
    return tok


def tokenizer_config(spec: TokenizerSpec) -> dict[str, Any]:
    added = {
        str(spec.tokens.index(t)): {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for t in spec.special_tokens
    }
    config: dict[str, Any] = {
        "add_bos_token": spec.add_bos,
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "additional_special_tokens": list(spec.special_tokens),
        "bos_token": spec.bos_token,
        "clean_up_tokenization_spaces": False,
        "eos_token": spec.eos_token,
        "model_max_length": spec.model_max_length,
        "pad_token": spec.pad_token,
        "tokenizer_class": "LlamaTokenizer" if spec.pre_tokenizer == "spm" else "GPT2Tokenizer",
        "unk_token": spec.unk_token,
        "vocab_size": len(spec.tokens),
    }
    if spec.chat_template is not None:
        config["chat_template"] = spec.chat_template
    return config


def write_tokenizer(out_dir: Path, spec: TokenizerSpec) -> None:
    """Write ``tokenizer.json`` and ``tokenizer_config.json`` into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    text = build_tokenizer(spec).to_str(pretty=False)
    (out_dir / "tokenizer.json").write_text(text, encoding="utf-8")
    config = json.dumps(tokenizer_config(spec), indent=2, sort_keys=True, ensure_ascii=False)
    (out_dir / "tokenizer_config.json").write_text(config + "\n", encoding="utf-8")


def learn_merges(corpus: str, n_merges: int, kind: PreTokenizer = "smollm") -> list[str]:
    """A tiny deterministic BPE trainer (most frequent pair, ties lexicographic).

    Used for test vocabularies only. Pairs containing a digit are never merged, so digit
    handling is identical whichever way a runtime splits digits.
    """
    alphabet = byte_to_unicode()
    digits = {alphabet[b] for b in b"0123456789"}
    words: dict[tuple[str, ...], int] = {}
    for piece, _ in _pre_tokenizer(kind).pre_tokenize_str(corpus):
        key = tuple(piece)
        words[key] = words.get(key, 0) + 1
    merges: list[str] = []
    for _ in range(n_merges):
        counts: dict[tuple[str, str], int] = {}
        for word, freq in words.items():
            for a, b in itertools.pairwise(word):
                if digits.isdisjoint(a + b):
                    counts[(a, b)] = counts.get((a, b), 0) + freq
        if not counts:
            break
        best = min(counts, key=lambda pair: (-counts[pair], pair))
        merges.append(f"{best[0]} {best[1]}")
        words = {_merge(word, best): freq for word, freq in words.items()}
    return merges


def _merge(word: Sequence[str], pair: tuple[str, str]) -> tuple[str, ...]:
    out: list[str] = []
    i = 0
    while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
            out.append(word[i] + word[i + 1])
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)
