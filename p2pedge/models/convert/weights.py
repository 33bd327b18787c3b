"""In-memory Llama weights: the one format every importer produces and every builder reads.

Layout follows the Hugging Face convention: matrices are ``[out_features, in_features]``
and Q/K rows use the rotate-half rotary layout (a GGUF reader un-permutes llama.cpp's
interleaved rows). A GGUF Q4_1 matrix is kept as its blocks so the ONNX builder can map
it losslessly onto ``MatMulNBits``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

F32 = npt.NDArray[np.float32]
Q4_1_BLOCK = 32


@dataclass(frozen=True)
class LlamaConfig:
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


Matrix = F32 | Q4_1Matrix


def as_float(matrix: Matrix) -> F32:
    return matrix.dequantize() if isinstance(matrix, Q4_1Matrix) else matrix


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


@dataclass(frozen=True)
class LlamaWeights:
    config: LlamaConfig
    token_embd: F32  # [vocab, hidden]
    blocks: Sequence[LlamaBlock]  # indexed by global block number
    output_norm: F32  # [hidden]
    lm_head: F32 | None  # [vocab, hidden]; None when tied to token_embd
