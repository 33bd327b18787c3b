"""In-memory Llama weights: the one format every importer produces and every builder reads.

Layout follows the Hugging Face convention: matrices are ``[out_features, in_features]``
and Q/K rows use the rotate-half rotary layout (a GGUF reader un-permutes llama.cpp's
interleaved rows). Quantised GGUF matrices are kept as their integer quants so the ONNX
builder can map them losslessly onto ``MatMulNBits``: 4-bit blocks of 32 (Q4_0, Q4_1,
Q4_K) as :class:`Q4_1Matrix`, the rest (Q8_0, Q5_*, Q6_K, Q2_K, Q3_K) as
:class:`QuantMatrix` with 8-bit or 4-bit integers in blocks of 32 or 16.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

F32 = npt.NDArray[np.float32]
Q4_1_BLOCK = 32


@dataclass(frozen=True)
class LlamaConfig:
    """Hyper-parameters; ``arch`` is the GGUF architecture (``llama``, ``qwen2``, ``qwen3``,
    ``phi3``, ``gemma2``, ``gemma3``). The fields after ``rope_factors`` default to Llama's
    behaviour; Gemma sets them (its RMSNorm weight offset of +1 is already in the weights)."""

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
    arch: str = "llama"
    rope_factors: tuple[float, ...] = ()  # Llama 3.1+ ``rope_freqs``: inv_freq[i] / factor[i]
    activation: str = "silu"  # gated MLP: "silu" (SwiGLU) or "gelu_tanh" (GeGLU)
    embed_scale: float = 1.0  # embeddings times this (Gemma: sqrt(hidden))
    attn_scale: float = 0.0  # softmax scale; 0 means 1 / sqrt(head_dim)
    attn_softcap: float = 0.0  # scores -> cap * tanh(scores / cap) when > 0 (Gemma 2)
    final_softcap: float = 0.0  # the same on the logits
    sliding_window: int = 0  # a sliding layer's query sees the last this many positions
    swa_layers: tuple[bool, ...] = ()  # per block: sliding window (empty: none)
    rope_base_swa: float = 0.0  # rope base of sliding layers; 0 means rope_base (Gemma 3)

    def softmax_scale(self) -> float:
        return self.attn_scale if self.attn_scale > 0 else 1.0 / math.sqrt(self.head_dim)

    def is_swa(self, layer: int) -> bool:
        return bool(self.swa_layers) and self.swa_layers[layer]

    def inv_freq(self, swa: bool = False) -> npt.NDArray[np.float64]:
        """Rotary inverse frequencies ``[head_dim / 2]`` (rope base, frequency factors);
        ``swa`` picks the sliding layers' base."""
        half = self.head_dim // 2
        base = self.rope_base_swa if swa and self.rope_base_swa > 0 else self.rope_base
        inv: npt.NDArray[np.float64] = 1.0 / (
            base ** (np.arange(half, dtype=np.float64) * 2 / self.head_dim)
        )
        if self.rope_factors:
            inv = inv / np.asarray(self.rope_factors, dtype=np.float64)
        return inv


@dataclass(frozen=True)
class Q4_1Matrix:
    """A ``[out, in]`` matrix as GGUF Q4_1 blocks of 32 consecutive ``in`` elements.

    Element ``j`` of a block is ``scale * q_j + minimum`` with ``q_j`` in 0..15; ``quants``
    packs element ``j`` in the low nibble of byte ``j`` and element ``j + 16`` in the high
    nibble (GGUF order).
    """

    out_features: int
    in_features: int
    scales: F32  # [out, in // 32]
    mins: F32  # [out, in // 32]
    quants: npt.NDArray[np.uint8]  # [out, in // 32, 16]

    def dequantize(self) -> F32:
        low = (self.quants & 0x0F).astype(np.float32)
        high = (self.quants >> 4).astype(np.float32)
        q = np.concatenate([low, high], axis=-1)  # [out, blocks, 32]
        values = q * self.scales[..., None] + self.mins[..., None]
        return values.reshape(self.out_features, self.in_features).astype(np.float32)


@dataclass(frozen=True)
class QuantMatrix:
    """A ``[out, in]`` matrix as ``scales * (q - zero) + mins`` per block of ``in`` elements.

    ``q`` holds unsigned ``bits``-bit integers (4 or 8), one per byte, in element order;
    ``zero`` is one zero point for every block (the GGUF type's constant offset); ``mins``
    is an optional additive term per block. Every product is exact in float32 (fp16 scales
    times at most 8-bit sub-scales), so this is the GGUF tensor's dequantised value exactly.
    """

    out_features: int
    in_features: int
    block: int  # 16 or 32
    bits: int  # 4 or 8
    zero: int
    scales: F32  # [out, in // block]
    mins: F32 | None  # [out, in // block]
    q: npt.NDArray[np.uint8]  # [out, in]
    qtype: str = ""  # the GGUF type it came from, for reports

    def dequantize(self) -> F32:
        nb = self.in_features // self.block
        q = self.q.reshape(self.out_features, nb, self.block).astype(np.float32)
        values = (q - np.float32(self.zero)) * self.scales[..., None]
        if self.mins is not None:
            values = values + self.mins[..., None]
        return values.reshape(self.out_features, self.in_features).astype(np.float32)

    def rows(self, start: int, end: int) -> QuantMatrix:
        mins = None if self.mins is None else self.mins[start:end]
        return QuantMatrix(
            end - start,
            self.in_features,
            self.block,
            self.bits,
            self.zero,
            self.scales[start:end],
            mins,
            self.q[start:end],
            self.qtype,
        )

    def scaled(self, factor: np.float32) -> QuantMatrix:
        """Every value times ``factor`` (exact for a power of two)."""
        mins = None if self.mins is None else (self.mins * factor).astype(np.float32)
        return QuantMatrix(
            self.out_features,
            self.in_features,
            self.block,
            self.bits,
            self.zero,
            (self.scales * factor).astype(np.float32),
            mins,
            self.q,
            self.qtype,
        )


Matrix = F32 | Q4_1Matrix | QuantMatrix


# An embedding or head table: float32, or (K-quants and other non-Q8_0 types) integers.
Table = F32 | QuantMatrix


def as_float(matrix: Matrix) -> F32:
    return matrix if isinstance(matrix, np.ndarray) else matrix.dequantize()


@dataclass(frozen=True)
class LlamaBlock:
    attn_norm: F32  # [hidden]
    wq: Matrix  # [n_heads * head_dim, hidden]
    wk: Matrix  # [n_kv_heads * head_dim, hidden]
    wv: Matrix  # [n_kv_heads * head_dim, hidden]
    wo: Matrix  # [hidden, n_heads * head_dim]
    ffn_norm: F32  # [hidden]
    w_gate: Matrix  # [ffn, hidden]
    w_up: Matrix  # [ffn, hidden]
    w_down: Matrix  # [hidden, ffn]
    # qwen2: biases of the Q/K/V projections (HF layout, like the matrices' rows)
    bq: F32 | None = None
    bk: F32 | None = None
    bv: F32 | None = None
    # qwen3: RMSNorm weights applied to each head of Q and K ([head_dim])
    q_norm: F32 | None = None
    k_norm: F32 | None = None
    # gemma2/3: RMSNorm of the attention and MLP outputs before their residual adds
    attn_post_norm: F32 | None = None
    ffn_post_norm: F32 | None = None


@dataclass(frozen=True)
class LlamaWeights:
    config: LlamaConfig
    token_embd: Table  # [vocab, hidden]
    blocks: Sequence[LlamaBlock]  # indexed by global block number
    output_norm: F32  # [hidden]
    lm_head: Table | None  # [vocab, hidden]; None when tied to token_embd
