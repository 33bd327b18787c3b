"""The attention half of the decoder graph: graph I/O names, masks, rotary, Q/K/V, attention.

Split from :mod:`.onnx_graph` (which adds norms, MLP, embedding and head) so each stays
readable. Per graph (not per block) it computes the additive attention bias from
``attention_mask`` and the absolute query offsets ``past = total - seq`` (so left padding
and multi-token decode are both right), a second bias for sliding-window blocks, and the
rotary inputs for ``position_ids`` (a second set where sliding blocks use their own base).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import numpy as np
import onnx

from p2pedge.ids import LayerRange
from p2pedge.models.convert.onnx_ops import MS_DOMAIN, Linear
from p2pedge.models.convert.weights import (
    LlamaBlock,
    LlamaConfig,
    LlamaWeights,
    Matrix,
    Q4_1Matrix,
    QuantMatrix,
)

MASK_VALUE = -1.0e9
Attention = Literal["gqa", "ops"]

INPUT_IDS = "input_ids"
ATTENTION_MASK = "attention_mask"
POSITION_IDS = "position_ids"
HIDDEN_IN = "hidden_states"
HIDDEN_OUT_FIRST = "hidden_states"
HIDDEN_OUT_MIDDLE = "hidden_states_out"
LOGITS = "logits"


def past_key(i: int) -> str:
    return f"past_key_values.{i}.key"


def past_value(i: int) -> str:
    return f"past_key_values.{i}.value"


def present_key(i: int) -> str:
    return f"present.{i}.key"


def present_value(i: int) -> str:
    return f"present.{i}.value"


def rope_tables(config: LlamaConfig, swa: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """``cos``/``sin`` tables ``[context_length, head_dim]`` (rotate-half layout)."""
    inv_freq = config.inv_freq(swa)
    angles = np.arange(config.context_length, dtype=np.float64)[:, None] * inv_freq[None, :]
    angles = np.concatenate([angles, angles], axis=-1)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def exact_power_of_two(value: float) -> bool:
    mantissa, _ = math.frexp(value)
    return mantissa == 0.5


def scaled(matrix: Matrix, factor: float) -> Matrix:
    """``matrix`` times ``factor`` (exact for a power of two), quants kept."""
    if isinstance(matrix, QuantMatrix):
        return matrix.scaled(np.float32(factor))
    if isinstance(matrix, Q4_1Matrix):
        return Q4_1Matrix(
            matrix.out_features,
            matrix.in_features,
            (matrix.scales * np.float32(factor)).astype(np.float32),
            (matrix.mins * np.float32(factor)).astype(np.float32),
            matrix.quants,
        )
    return (matrix * np.float32(factor)).astype(np.float32)


def as_attention(name: str) -> Attention:
    for a in ("gqa", "ops"):
        if a == name:
            return a
    raise ValueError(f"unknown attention implementation {name!r}")


class AttentionBuilder:
    """Graph state shared by every block, and the attention half of a block."""

    def __init__(
        self,
        weights: LlamaWeights,
        layers: LayerRange,
        attention: Attention,
        linear: Linear,
        dequantize: bool,
    ) -> None:
        cfg = weights.config
        self.w = weights
        self.cfg = cfg
        self.layers = layers
        self.g = linear.g
        self.linear = linear
        self.dequantize = dequantize
        self.group = cfg.n_heads // cfg.n_kv_heads
        self.softmax_scale = cfg.softmax_scale()
        # A power-of-two scale folds into W_q exactly (also into Q4_1 scales and mins).
        self.fold_scale = exact_power_of_two(self.softmax_scale)
        self.use_gqa = attention == "gqa"
        self._biases: dict[bool, str] = {}
        self._rope_inputs: dict[bool, tuple[str, str]] = {}

    def _matrix(self, m: Matrix) -> Matrix:
        if self.dequantize and not isinstance(m, np.ndarray):
            return m.dequantize()
        return m

    def _window(self, i: int) -> bool:
        return self.cfg.is_swa(i)

    def _bias(self, i: int) -> str:
        """The additive bias of block ``i`` (built once per kind, on first use)."""
        swa = self._window(i)
        if swa not in self._biases:
            self._biases[swa] = self._attention_bias(not self.use_gqa, swa)
        return self._biases[swa]

    def _attention_bias(self, tiled: bool, swa: bool) -> str:
        """Additive bias ``[batch, 1, group * seq, total]``: 0 where allowed, else -1e9.

        Query ``i`` of this call sits at absolute cache index ``past + i``; it may see key
        ``j`` when ``j <= past + i``, ``attention_mask[b, j] == 1`` and, in a sliding block,
        ``past + i - j < sliding_window``. Rows are tiled ``group`` times so one bias serves
        the grouped-query score layout.
        """
        g = self.g
        seq = g.op1("Gather", [g.op1("Shape", [POSITION_IDS]), g.i64(1)], axis=0)
        total = g.op1("Gather", [g.op1("Shape", [ATTENTION_MASK]), g.i64(1)], axis=0)
        past = g.op1("Sub", [total, seq])
        q_idx = g.op1("Unsqueeze", [g.op1("Range", [past, total, g.const(np.int64(1))]), g.i64(1)])
        k_idx = g.op1("Range", [g.const(np.int64(0)), total, g.const(np.int64(1))])
        causal = g.op1("LessOrEqual", [k_idx, q_idx])  # [seq, total]
        if swa:
            lowest = g.op1("Sub", [q_idx, g.const(np.int64(self.cfg.sliding_window))])
            causal = g.op1("And", [causal, g.op1("Greater", [k_idx, lowest])])
        keep = g.op1("Cast", [ATTENTION_MASK], to=onnx.TensorProto.BOOL)
        keep = g.op1("Unsqueeze", [keep, g.i64(1, 2)])  # [batch, 1, 1, total]
        allowed = g.op1("And", [causal, keep])  # [batch, 1, seq, total]
        bias = g.op1("Where", [allowed, g.const(np.float32(0.0)), g.const(np.float32(MASK_VALUE))])
        if self.group == 1 or not tiled:
            return bias
        tile = "attn_bias_swa/Tile" if swa else "attn_bias/Tile"
        return g.op1("Tile", [bias, g.i64(1, 1, self.group, 1)], name=tile)

    def _gqa_inputs(self) -> None:
        """Per-graph GQA inputs: ``seqlens_k`` [batch] int32 and the total length."""
        g = self.g
        total = g.op1("Gather", [g.op1("Shape", [ATTENTION_MASK]), g.i64(1)], axis=0)
        total32 = g.op1("Cast", [total], to=onnx.TensorProto.INT32)
        self.gqa_total = total32
        batch = g.op1("Gather", [g.op1("Shape", [ATTENTION_MASK]), g.i64(0)], axis=0)
        minus1 = g.op1("Sub", [total32, g.const(np.int32(1))])
        self.gqa_seqlens = g.op1("Expand", [minus1, batch])

    def _rope_for(self, i: int) -> tuple[str, str]:
        """Block ``i``'s rotary inputs: half cos/sin tables for GQA's RotaryEmbedding, or
        cos/sin rows ``[batch, seq, 1, head_dim]`` gathered once per graph for ``ops``."""
        swa = self._window(i) and self.cfg.rope_base_swa not in (0.0, self.cfg.rope_base)
        if swa not in self._rope_inputs:
            g, tag = self.g, ".swa" if swa else ""
            cos_t, sin_t = rope_tables(self.cfg, swa)
            if self.use_gqa:
                half = self.cfg.head_dim // 2
                self._rope_inputs[swa] = (
                    g.initializer(f"rope.cos_half{tag}", np.ascontiguousarray(cos_t[:, :half])),
                    g.initializer(f"rope.sin_half{tag}", np.ascontiguousarray(sin_t[:, :half])),
                )
            else:
                rows = []
                for name, table in ((f"rope.cos{tag}", cos_t), (f"rope.sin{tag}", sin_t)):
                    gathered = g.op1("Gather", [g.initializer(name, table), POSITION_IDS], axis=0)
                    rows.append(g.op1("Unsqueeze", [gathered, g.i64(2)]))
                self._rope_inputs[swa] = (rows[0], rows[1])
        return self._rope_inputs[swa]

    def _qkv(self, i: int, block: LlamaBlock, x: str) -> list[str]:
        """One fused projection, split into q ``[b, s, nh*hd]`` and k, v ``[b, s, kvh*hd]``.

        qwen2 adds biases; qwen3 and gemma3 RMS-normalise each head of q and k, so there
        the folded softmax scale goes into the q norm's weights instead of W_q."""
        g, cfg = self.g, self.cfg
        nh, kvh, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        wq = self._matrix(block.wq)
        if self.fold_scale and block.q_norm is None:
            wq = scaled(wq, self.softmax_scale)
        mats = [wq, self._matrix(block.wk), self._matrix(block.wv)]
        qkv = self.linear(x, mats, f"layers.{i}.attn.qkv")
        if block.bq is not None and block.bk is not None and block.bv is not None:
            bq = block.bq * np.float32(self.softmax_scale) if self.fold_scale else block.bq
            bias = np.concatenate([bq, block.bk, block.bv]).astype(np.float32)
            qkv = g.op1(
                "Add",
                [qkv, g.initializer(f"layers.{i}.attn.qkv_bias", bias)],
                name=f"layers.{i}/qkv_bias",
            )
        q, k, v = g.op(
            "Split",
            [qkv, g.i64(nh * hd, kvh * hd, kvh * hd)],
            n_out=3,
            axis=-1,
            name=f"layers.{i}/qkv_split",
        )
        if block.q_norm is not None and block.k_norm is not None:
            q_gamma = block.q_norm
            if self.fold_scale:
                q_gamma = (q_gamma * np.float32(self.softmax_scale)).astype(np.float32)
            q = self._head_norm(q, nh, q_gamma, f"layers.{i}.attn.q_norm")
            k = self._head_norm(k, kvh, block.k_norm, f"layers.{i}.attn.k_norm")
        return [q, k, v]

    def _head_norm(self, x: str, heads: int, gamma: np.ndarray, name: str) -> str:
        """RMSNorm over each head of ``x`` ``[b, s, heads * head_dim]`` (qwen3, gemma3)."""
        g, hd = self.g, self.cfg.head_dim
        per_head = g.op1("Reshape", [x, g.i64(0, 0, heads, hd)])
        normed = g.op1(
            "SimplifiedLayerNormalization",
            [per_head, g.initializer(name, gamma)],
            axis=-1,
            epsilon=self.cfg.rms_eps,
            name=name,
        )
        return g.op1("Reshape", [normed, g.i64(0, 0, heads * hd)])

    def _attention_gqa(self, i: int, block: LlamaBlock, x: str) -> str:
        """RotaryEmbedding (honours ``position_ids``) + GroupQueryAttention.

        GQA's own rotary derives positions from ``seqlens_k`` and would be wrong for
        left-padded rows, so RoPE is applied beforehand. ``seqlens_k`` is ``total - 1`` for
        every row, which makes GQA's causal window index-based, and padding (and a sliding
        window) is masked by the shared additive bias, exactly like the ``ops`` path; GQA
        soft-caps the scaled scores before it adds that bias.
        """
        g, cfg = self.g, self.cfg
        nh, kvh = cfg.n_heads, cfg.n_kv_heads
        q, k, v = self._qkv(i, block, x)
        cos, sin = self._rope_for(i)
        q = g.op1(
            "RotaryEmbedding",
            [q, POSITION_IDS, cos, sin],
            domain=MS_DOMAIN,
            num_heads=nh,
            interleaved=0,
        )
        k = g.op1(
            "RotaryEmbedding",
            [k, POSITION_IDS, cos, sin],
            domain=MS_DOMAIN,
            num_heads=kvh,
            interleaved=0,
        )
        extra: dict[str, Any] = {"softcap": cfg.attn_softcap} if cfg.attn_softcap > 0 else {}
        ctx = g.op(
            "GroupQueryAttention",
            [
                q,
                k,
                v,
                past_key(i),
                past_value(i),
                self.gqa_seqlens,
                self.gqa_total,
                "",
                "",
                "",
                self._bias(i),
            ],
            outputs=[f"layers.{i}/attn_ctx", present_key(i), present_value(i)],
            domain=MS_DOMAIN,
            num_heads=nh,
            kv_num_heads=kvh,
            do_rotary=0,
            scale=1.0 if self.fold_scale else self.softmax_scale,
            name=f"layers.{i}/GroupQueryAttention",
            **extra,
        )[0]
        return self.linear(ctx, [self._matrix(block.wo)], f"layers.{i}.attn.o")

    def _rope(self, x: str, heads: int, cos: str, sin: str) -> str:
        """Rotate-half RoPE on ``[batch, seq, heads * head_dim]``, result ``[b, s, h, d]``."""
        g, hd = self.g, self.cfg.head_dim
        x4 = g.op1("Reshape", [x, g.i64(0, 0, heads, hd)])
        x1, x2 = g.op("Split", [x4, g.i64(hd // 2, hd // 2)], n_out=2, axis=-1)
        rotated = g.op1("Concat", [g.op1("Neg", [x2]), x1], axis=-1)
        return g.op1("Add", [g.op1("Mul", [x4, cos]), g.op1("Mul", [rotated, sin])])

    def softcap(self, x: str, cap: float, name: str) -> str:
        """``cap * tanh(x / cap)`` (Gemma 2's attention and final logit soft-capping)."""
        g = self.g
        inner = g.op1("Div", [x, g.const(np.float32(cap))], name=f"{name}/Div")
        return g.op1("Mul", [g.op1("Tanh", [inner]), g.const(np.float32(cap))], name=f"{name}/Mul")

    def _attention(self, i: int, block: LlamaBlock, x: str) -> str:
        """Attention in standard ops; queries grouped per KV head, so K/V are never expanded."""
        g, cfg = self.g, self.cfg
        nh, kvh, hd, grp = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, self.group
        q, k, v = self._qkv(i, block, x)
        cos, sin = self._rope_for(i)
        q = self._rope(q, nh, cos, sin)  # [b, s, nh, hd]
        k = self._rope(k, kvh, cos, sin)  # [b, s, kvh, hd]
        v = g.op1("Reshape", [v, g.i64(0, 0, kvh, hd)])
        k = g.op1("Transpose", [k], perm=[0, 2, 1, 3])
        v = g.op1("Transpose", [v], perm=[0, 2, 1, 3])
        key = g.op1("Concat", [past_key(i), k], outputs=[present_key(i)], axis=2)
        value = g.op1("Concat", [past_value(i), v], outputs=[present_value(i)], axis=2)
        # Queries grouped by their KV head: [b, kvh, grp * s, hd], no K/V expansion needed.
        q = g.op1("Reshape", [q, g.i64(0, 0, kvh, grp, hd)])
        q = g.op1("Transpose", [q], perm=[0, 2, 3, 1, 4])
        q = g.op1("Reshape", [q, g.i64(0, kvh, -1, hd)])
        scores = g.op1(
            "FusedMatMul",
            [q, key],
            domain=MS_DOMAIN,
            transB=1,
            alpha=1.0 if self.fold_scale else self.softmax_scale,
            name=f"layers.{i}/scores",
        )
        if cfg.attn_softcap > 0:
            scores = self.softcap(scores, cfg.attn_softcap, f"layers.{i}/softcap")
        probs = g.op1("Softmax", [g.op1("Add", [scores, self._bias(i)])], axis=-1)
        ctx = g.op1("MatMul", [probs, value])  # [b, kvh, grp * s, hd]
        ctx = g.op1("Reshape", [ctx, g.i64(0, kvh, grp, -1, hd)])
        ctx = g.op1("Transpose", [ctx], perm=[0, 3, 1, 2, 4])
        ctx = g.op1("Reshape", [ctx, g.i64(0, 0, nh * hd)])
        return self.linear(ctx, [self._matrix(block.wo)], f"layers.{i}.attn.o")

    def attention(self, i: int, block: LlamaBlock, x: str) -> str:
        if self.use_gqa:
            return self._attention_gqa(i, block, x)
        return self._attention(i, block, x)
