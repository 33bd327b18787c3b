"""Random-weight GGUF files of a given architecture, shape and tensor type, for tests.

Quantised matrices are random *valid* blocks of their type (random quant and sub-scale
bytes, finite fp16 super-scales sized so activations keep their scale), written with the
``gguf`` package exactly as llama.cpp lays them out. Tokenizers: byte-level BPE with the
``smollm``, ``llama-bpe`` or ``qwen2`` pre-tokenizer, or a SentencePiece-style ``llama``
vocabulary (``<unk>``, ``<s>``, ``</s>``, 256 ``<0xXX>`` byte tokens, ``▁`` pieces, scores).
Tiny by default; the shape is a parameter.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import gguf
import numpy as np
import numpy.typing as npt

from p2pedge.models.convert.tokenizer import byte_to_unicode, learn_merges

T = gguf.GGMLQuantizationType
TokenizerKind = Literal["smollm", "llama-bpe", "qwen2", "llama-spm"]
# Byte offsets of the fp16 scale(s) in one block of each type (d, then dmin where present),
# and the dmin/d ratio that centres a block's values on zero.
_FP16_FIELDS: dict[gguf.GGMLQuantizationType, tuple[tuple[int, ...], float]] = {
    T.Q4_0: ((0,), 0.0),
    T.Q4_1: ((0, 2), -7.5),  # m = -7.5 d
    T.Q5_0: ((0,), 0.0),
    T.Q5_1: ((0, 2), -15.5),
    T.Q8_0: ((0,), 0.0),
    T.Q2_K: ((80, 82), 1.5),
    T.Q3_K: ((108,), 0.0),
    T.Q4_K: ((0, 2), 7.5),
    T.Q5_K: ((0, 2), 15.5),
    T.Q6_K: ((208,), 0.0),
}
QTYPES = tuple(t.name for t in _FP16_FIELDS)
_CORPUS = (
    "The quick brown fox jumps over the lazy dog. Hello world! How are you today? "
    "What is the capital of France? The capital of France is Paris. "
    "the the and and of of to to in in is is it it that that with with for for on on "
)


@dataclass(frozen=True)
class SyntheticShape:
    n_layers: int = 2
    hidden: int = 256  # K-quants need multiples of 256 along every matrix's input
    n_heads: int = 4
    n_kv_heads: int = 2
    ffn: int = 512
    context_length: int = 128
    rope_base: float = 10000.0
    rms_eps: float = 1e-5


@dataclass(frozen=True)
class SyntheticSpec:
    """What to write: ``qtype`` for every block matrix unless ``overrides`` names one
    (e.g. ``{"ffn_down": "Q6_K"}`` as in Q4_K_M files); the embedding is ``embd_qtype``."""

    arch: Literal["llama", "qwen2", "qwen3", "phi3", "gemma2", "gemma3"] = "llama"
    qtype: str = "Q4_1"
    embd_qtype: str = "Q8_0"
    overrides: dict[str, str] = field(default_factory=dict)
    tokenizer: TokenizerKind = "smollm"
    shape: SyntheticShape = SyntheticShape()
    untied_head: bool = False
    rope_factors: bool = False  # Llama 3.1-style ``rope_freqs.weight``
    long_rope: bool = False  # Phi-3 128k-style ``rope_factors_long/short.weight``
    # gemma2/3: a window short enough to matter in tests, soft caps tight enough to bite
    # (gemma2; the real 50 and 30 barely touch random weights), no pattern key by default
    sliding_window: int = 8
    swa_pattern: int | None = None
    softcaps: tuple[float, float] = (4.0, 6.0)
    seed: int = 0


def random_blocks(
    rng: np.random.Generator, qtype: str, out: int, inp: int, std: float
) -> npt.NDArray[np.uint8]:
    """Random valid ``qtype`` blocks for an ``[out, inp]`` matrix whose values have about
    ``std`` standard deviation; F32/F16/BF16 give a float array instead."""
    kind = T[qtype]
    if kind in (T.F32, T.F16, T.BF16):
        values = (std * rng.standard_normal((out, inp))).astype(np.float32)
        if kind == T.F32:
            return values  # type: ignore[return-value]
        return gguf.quants.quantize(values, kind)  # type: ignore[no-any-return]
    block, size = gguf.GGML_QUANT_SIZES[kind]
    raw = rng.integers(0, 256, size=(out * inp // block, size), dtype=np.uint8)
    offsets, ratio = _FP16_FIELDS[kind]

    def set_scales(d: float) -> None:
        jitter = rng.uniform(0.7, 1.3, size=(raw.shape[0], 1))
        for at, value in zip(offsets, (d, d * ratio), strict=False):
            raw[:, at : at + 2] = (value * jitter).astype(np.float16).view(np.uint8)

    set_scales(1.0)
    measured = float(np.std(gguf.quants.dequantize(raw, kind)))
    set_scales(std / measured)
    return raw.reshape(out, -1)


def _tokenizer(w: gguf.GGUFWriter, kind: TokenizerKind) -> int:
    """Write the tokenizer keys; returns the vocabulary size."""
    if kind == "llama-spm":
        tokens, scores, types = spm_vocab()
        w.add_tokenizer_model("llama")
        w.add_tokenizer_pre("default")
        w.add_token_list(tokens)
        w.add_token_scores(scores)
        w.add_token_types(types)
        w.add_unk_token_id(0)
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_add_bos_token(True)
        w.add_chat_template("{% for m in messages %}[INST] {{ m['content'] }} [/INST]{% endfor %}")
        return len(tokens)
    specials = {
        "smollm": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        "qwen2": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        "llama-bpe": ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"],
    }[kind]
    alphabet = [byte_to_unicode()[b] for b in range(256)]
    merges = learn_merges(_CORPUS, 64, "smollm" if kind == "smollm" else "gpt2")
    tokens = list(alphabet)
    for merge in merges:
        joined = merge.replace(" ", "")
        if joined not in tokens:
            tokens.append(joined)
    first = len(tokens)
    tokens += specials
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(kind)
    w.add_token_list(tokens)
    w.add_token_types([1] * first + [3] * len(specials))
    w.add_token_merges(merges)
    w.add_bos_token_id(first + (0 if kind == "llama-bpe" else 1))
    w.add_eos_token_id(first + 2)
    w.add_chat_template("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    return len(tokens)


def spm_vocab() -> tuple[list[str], list[float], list[int]]:
    """A SentencePiece-style vocabulary: 3 controls, 256 byte tokens, then ``▁`` pieces
    learnt from a corpus, each scored by its rank (higher merges first, as in SPM)."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [2, 3, 3] + [6] * 256
    scores = [0.0, 0.0, 0.0] + [0.0] * 256
    text = "▁" + _CORPUS.strip().replace(" ", "▁")
    chars = sorted(set(text))
    pieces: list[str] = list(chars)
    words = [tuple("▁" + w) for w in _CORPUS.split()]
    for _ in range(80):  # greedy pair merges, as a BPE-trained SentencePiece model has
        counts: dict[tuple[str, str], int] = {}
        for word in words:
            for a, b in itertools.pairwise(word):
                counts[(a, b)] = counts.get((a, b), 0) + 1
        if not counts:
            break
        best = min(counts, key=lambda p: (-counts[p], p))
        pieces.append(best[0] + best[1])
        words = [_merge_word(word, best) for word in words]
    for rank, piece in enumerate(dict.fromkeys(pieces)):
        tokens.append(piece)
        types.append(1)
        scores.append(-float(rank))
    return tokens, scores, types


def _merge_word(word: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
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


def write_synthetic_gguf(path: Path, spec: SyntheticSpec = SyntheticSpec()) -> Path:
    """Write a random-weight GGUF for ``spec`` to ``path``."""
    s = spec.shape
    rng = np.random.default_rng(spec.seed)
    head_dim = s.hidden // s.n_heads
    w = gguf.GGUFWriter(str(path), spec.arch)
    w.add_block_count(s.n_layers)
    w.add_context_length(s.context_length)
    w.add_embedding_length(s.hidden)
    w.add_feed_forward_length(s.ffn)
    w.add_head_count(s.n_heads)
    w.add_head_count_kv(s.n_kv_heads)
    gemma = spec.arch in ("gemma2", "gemma3")
    if spec.arch == "gemma3":  # global layers use a 100x longer rope base, as Gemma 3
        w.add_rope_freq_base(s.rope_base * 100)
        w.add_rope_freq_base_swa(s.rope_base)
    else:
        w.add_rope_freq_base(s.rope_base)
    if gemma:
        w.add_sliding_window(spec.sliding_window)
        if spec.swa_pattern is not None:
            w.add_sliding_window_pattern(spec.swa_pattern)
    if spec.arch == "gemma2":
        w.add_attn_logit_softcapping(spec.softcaps[0])
        w.add_final_logit_softcapping(spec.softcaps[1])
    w.add_layer_norm_rms_eps(s.rms_eps)
    if spec.arch == "phi3":
        w.add_rope_dimension_count(head_dim)
    vocab = _tokenizer(w, spec.tokenizer)
    w.add_vocab_size(vocab)

    def matrix(name: str, out: int | tuple[int, ...], inp: int, gain: float = 1.0) -> None:
        """One matrix; a tuple of ``out`` sizes fuses parts (phi3), the first at ``gain``."""
        role = name.split(".")[-2]
        qtype = spec.overrides.get(role, spec.qtype)
        parts = out if isinstance(out, tuple) else (out,)
        data = np.concatenate(
            [
                random_blocks(rng, qtype, n, inp, (gain if j == 0 else 1.0) / np.sqrt(inp))
                for j, n in enumerate(parts)
            ]
        )
        if T[qtype] == T.F32:
            w.add_tensor(name, data)
        else:
            w.add_tensor(name, data, raw_dtype=T[qtype])

    def vector(name: str, n: int, mean: float = 1.0, std: float = 0.1) -> None:
        w.add_tensor(name, (mean + std * rng.standard_normal(n)).astype(np.float32))

    # Gemma multiplies embeddings by sqrt(hidden) and shares them with the head: smaller
    # values (as real Gemma tables have) and a larger final norm keep logits in range
    # without every position predicting its own input token.
    embd_std = 0.3 / np.sqrt(s.hidden) if gemma else 0.3
    embd = random_blocks(rng, spec.embd_qtype, vocab, s.hidden, embd_std)
    kind = T[spec.embd_qtype]
    w.add_tensor("token_embd.weight", embd, raw_dtype=None if kind == T.F32 else kind)
    q_out, kv_out = s.n_heads * head_dim, s.n_kv_heads * head_dim
    for i in range(s.n_layers):
        p = f"blk.{i}."
        vector(p + "attn_norm.weight", s.hidden)
        if spec.arch == "phi3":  # fused Q/K/V rows, then gate/up rows in one ffn_up
            matrix(p + "attn_qkv.weight", (q_out + kv_out, kv_out), s.hidden, 2.0)
        else:
            matrix(p + "attn_q.weight", q_out, s.hidden, 2.0)
            matrix(p + "attn_k.weight", kv_out, s.hidden, 2.0)
            matrix(p + "attn_v.weight", kv_out, s.hidden)
        if spec.arch in ("qwen3", "gemma3"):
            vector(p + "attn_q_norm.weight", head_dim)
            vector(p + "attn_k_norm.weight", head_dim)
        if spec.arch == "qwen2":
            vector(p + "attn_q.bias", q_out, 0.0, 0.5)
            vector(p + "attn_k.bias", kv_out, 0.0, 0.5)
            vector(p + "attn_v.bias", kv_out, 0.0, 0.5)
        matrix(p + "attn_output.weight", s.hidden, q_out, 2.0)
        # Norm weights already +1, as llama.cpp's converter writes them; post norms large
        # enough that blocks outweigh the sqrt(hidden)-scaled embedding in the residual.
        if gemma:
            vector(p + "post_attention_norm.weight", s.hidden, 4.0, 0.4)
        vector(p + "ffn_norm.weight", s.hidden)
        if spec.arch == "phi3":
            matrix(p + "ffn_up.weight", (s.ffn, s.ffn), s.hidden)
        else:
            matrix(p + "ffn_gate.weight", s.ffn, s.hidden)
            matrix(p + "ffn_up.weight", s.ffn, s.hidden)
        matrix(p + "ffn_down.weight", s.hidden, s.ffn, 2.0)
        if gemma:
            vector(p + "post_ffw_norm.weight", s.hidden, 4.0, 0.4)
    vector("output_norm.weight", s.hidden, np.sqrt(s.hidden) if gemma else 1.0)
    if spec.rope_factors:  # low frequencies slowed down, as Llama 3.1's long-context scaling
        w.add_tensor("rope_freqs.weight", np.geomspace(1.0, 8.0, head_dim // 2).astype(np.float32))
    if spec.long_rope:
        for kind in ("long", "short"):
            w.add_tensor(f"rope_factors_{kind}.weight", np.ones(head_dim // 2, np.float32))
    if spec.untied_head:
        matrix("output.weight", vocab, s.hidden)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
