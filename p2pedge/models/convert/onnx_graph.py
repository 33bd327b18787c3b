"""ONNX decoder graphs for Llama weights: the full model and block-range shards.

One builder serves both: a shard is a graph over blocks ``[start, end)`` whose input is
``input_ids`` when it starts at block 0 (embedding included) and ``hidden_states``
otherwise, and whose output is ``logits`` when it ends at the last block (final norm and
LM head included) and a hidden-state tensor otherwise. The full decoder is the shard that
covers every block, so the two can never drift apart numerically.

Per graph (not per block) the builder computes the additive attention bias from
``attention_mask`` and the absolute query offsets ``past = total - seq`` (so left padding and
multi-token decode are both right), and the rotary inputs for ``position_ids``.

Layout choices, all checked against :mod:`p2pedge.runtime.reference`: Q/K/V and gate/up
are fused into one matmul each; RMSNorm + residual use com.microsoft
SkipSimplifiedLayerNormalization; a power-of-two softmax scale (head_dim 16, 64, 256) is
folded into W_q exactly (into the Q norm for qwen3); in ``lossless4`` every quantised GGUF
matrix maps onto MatMulNBits as its integers (see ``Linear`` and ``quants``), the Q8_0
embedding doubles as an exact LM head (8-bit on the int8 path, two 4-bit halves with fp32
activations; see ``Q8Table``) and other quantised tables stay integers (``QuantTable``).
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import onnx

from p2pedge.ids import LayerRange
from p2pedge.models.convert.onnx_ops import (
    F32,
    I64,
    MS_DOMAIN,
    GraphBuilder,
    Linear,
)
from p2pedge.models.convert.tables import Q8Table, QuantTable, q8_0_blocks
from p2pedge.models.convert.weights import (
    LlamaBlock,
    LlamaConfig,
    LlamaWeights,
    Matrix,
    Q4_1Matrix,
    QuantMatrix,
    Table,
    as_float,
)

Variant = Literal["fp32", "lossless4"]
VARIANTS: tuple[Variant, ...] = ("fp32", "lossless4")
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


def rope_tables(config: LlamaConfig) -> tuple[np.ndarray, np.ndarray]:
    """``cos``/``sin`` tables ``[context_length, head_dim]`` (rotate-half layout)."""
    inv_freq = config.inv_freq()
    angles = np.arange(config.context_length, dtype=np.float64)[:, None] * inv_freq[None, :]
    angles = np.concatenate([angles, angles], axis=-1)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def exact_power_of_two(value: float) -> bool:
    mantissa, _ = math.frexp(value)
    return mantissa == 0.5


def _scaled(matrix: Matrix, factor: float) -> Matrix:
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


def as_variant(name: str) -> Variant:
    """Validate a variant name read from a file or command line."""
    for v in VARIANTS:
        if v == name:
            return v
    raise ValueError(f"unknown variant {name!r}; expected one of {VARIANTS}")


def as_attention(name: str) -> Attention:
    for a in ("gqa", "ops"):
        if a == name:
            return a
    raise ValueError(f"unknown attention implementation {name!r}")


def _prepare(weights: LlamaWeights, variant: Variant) -> LlamaWeights:
    as_variant(variant)
    return weights


class _Builder:
    def __init__(
        self,
        weights: LlamaWeights,
        layers: LayerRange,
        variant: Variant,
        int8_activations: bool,
        attention: Attention,
        int8_limbs: bool,
    ) -> None:
        cfg = weights.config
        if layers.end > cfg.n_layers:
            raise ValueError(f"layer range {layers} exceeds {cfg.n_layers} blocks")
        if int8_limbs and (int8_activations or variant != "lossless4"):
            raise ValueError("int8 limbs apply to lossless4 with fp32 activations only")
        self.w = weights
        self.cfg = cfg
        self.layers = layers
        self.variant = variant
        self.first = layers.start == 0
        self.last = layers.end == cfg.n_layers
        self.g = GraphBuilder(f"p2pedge_llama_{layers}")
        self.linear = Linear(self.g, 4 if int8_activations else 0, limbs=int8_limbs)
        self.group = cfg.n_heads // cfg.n_kv_heads
        softmax_scale = 1.0 / math.sqrt(cfg.head_dim)
        # A power-of-two scale folds into W_q exactly (also into Q4_1 scales and mins).
        self.fold_scale = exact_power_of_two(softmax_scale)
        self.softmax_scale = softmax_scale
        self.use_gqa = attention == "gqa"
        self.q8_tables: dict[str, Q8Table | None] = {}
        self.quant_tables: dict[str, QuantTable] = {}

    def _matrix(self, m: Matrix) -> Matrix:
        if self.variant == "fp32" and not isinstance(m, np.ndarray):
            return m.dequantize()
        return m

    def build(self) -> onnx.ModelProto:
        g, cfg = self.g, self.cfg
        kv_shape: list[str | int] = [
            "batch_size",
            cfg.n_kv_heads,
            "past_sequence_length",
            cfg.head_dim,
        ]
        out_kv_shape: list[str | int] = [
            "batch_size",
            cfg.n_kv_heads,
            "total_sequence_length",
            cfg.head_dim,
        ]
        if self.first:
            ids = g.add_input(INPUT_IDS, I64, ["batch_size", "sequence_length"])
        else:
            hidden_in = g.add_input(HIDDEN_IN, F32, ["batch_size", "sequence_length", cfg.hidden])
        g.add_input(ATTENTION_MASK, I64, ["batch_size", "total_sequence_length"])
        g.add_input(POSITION_IDS, I64, ["batch_size", "sequence_length"])
        for i in range(self.layers.start, self.layers.end):
            g.add_input(past_key(i), F32, kv_shape)
            g.add_input(past_value(i), F32, kv_shape)

        if self.first:
            quant = self._quant_table("model.embed_tokens", self.w.token_embd)
            if quant is not None:
                hidden = quant.gather(ids)
            else:
                dense = as_float(self.w.token_embd)
                table = self._q8_table("model.embed_tokens", dense)
                if table is not None:
                    hidden = table.gather(ids)
                else:
                    embd = g.initializer("model.embed_tokens.weight", dense)
                    hidden = g.op1("Gather", [embd, ids], name="embed/Gather")
        else:
            hidden = hidden_in
        if self.use_gqa:
            bias = self._attention_bias(tiled=False)
            cos = sin = ""
            self._gqa_inputs()
        else:
            bias = self._attention_bias()
            cos, sin = self._rope_rows()

        start_norm = self._blk(0).attn_norm
        if self.first:
            normed = g.op1(
                "SimplifiedLayerNormalization",
                [hidden, g.initializer(f"layers.{self.layers.start}.attn_norm", start_norm)],
                axis=-1,
                epsilon=cfg.rms_eps,
                name=f"layers.{self.layers.start}/attn_norm",
            )
            residual = hidden
        else:
            # The unsplit graph normalises this boundary with SkipSimplifiedLayerNormalization;
            # using the same kernel (with an exact zero skip) keeps shards bit-identical to it.
            zero = g.op1("Sub", [hidden, hidden], name="shard_in/zero")
            normed, residual = self._skip_norm(
                hidden, zero, start_norm, f"layers.{self.layers.start}.attn_norm"
            )
        for i in range(self.layers.start, self.layers.end):
            block = self.w.blocks[i]
            if self.use_gqa:
                attn = self._attention_gqa(i, block, normed, bias)
            else:
                attn = self._attention(i, block, normed, bias, cos, sin)
            normed, residual = self._skip_norm(
                attn, residual, block.ffn_norm, f"layers.{i}.ffn_norm"
            )
            mlp = self._mlp(i, block, normed)
            if i + 1 < self.layers.end:
                nxt = self.w.blocks[i + 1].attn_norm
                normed, residual = self._skip_norm(mlp, residual, nxt, f"layers.{i + 1}.attn_norm")
            elif self.last:
                normed, _ = self._skip_norm(mlp, residual, self.w.output_norm, "final_norm")
                self._lm_head(normed)
            else:
                name = HIDDEN_OUT_FIRST if self.first else HIDDEN_OUT_MIDDLE
                g.op("Add", [mlp, residual], outputs=[name], name="hidden_out/Add")
                g.add_output(name, F32, ["batch_size", "sequence_length", cfg.hidden])
        for i in range(self.layers.start, self.layers.end):
            g.add_output(present_key(i), F32, out_kv_shape)
            g.add_output(present_value(i), F32, out_kv_shape)
        return g.model()

    def _blk(self, offset: int) -> LlamaBlock:
        return self.w.blocks[self.layers.start + offset]

    def _skip_norm(self, x: str, skip: str, gamma: np.ndarray, name: str) -> tuple[str, str]:
        g = self.g
        out, total = f"{name}/out", f"{name}/sum"
        g.op(
            "SkipSimplifiedLayerNormalization",
            [x, skip, g.initializer(name, gamma)],
            outputs=[out, "", "", total],
            domain=MS_DOMAIN,
            epsilon=self.cfg.rms_eps,
            name=name,
        )
        return out, total

    def _gqa_inputs(self) -> None:
        """Per-graph GQA inputs: ``seqlens_k`` [batch] int32, total length, half cos/sin."""
        g = self.g
        total = g.op1("Gather", [g.op1("Shape", [ATTENTION_MASK]), g.i64(1)], axis=0)
        total32 = g.op1("Cast", [total], to=onnx.TensorProto.INT32)
        self.gqa_total = total32
        batch = g.op1("Gather", [g.op1("Shape", [ATTENTION_MASK]), g.i64(0)], axis=0)
        minus1 = g.op1("Sub", [total32, g.const(np.int32(1))])
        self.gqa_seqlens = g.op1("Expand", [minus1, batch])
        cos_t, sin_t = rope_tables(self.cfg)
        half = self.cfg.head_dim // 2
        self.gqa_cos = g.initializer("rope.cos_half", np.ascontiguousarray(cos_t[:, :half]))
        self.gqa_sin = g.initializer("rope.sin_half", np.ascontiguousarray(sin_t[:, :half]))

    def _qkv(self, i: int, block: LlamaBlock, x: str) -> list[str]:
        """One fused projection, split into q ``[b, s, nh*hd]`` and k, v ``[b, s, kvh*hd]``.

        qwen2 adds biases; qwen3 RMS-normalises each head of q and k, so there the folded
        softmax scale goes into the q norm's weights instead of W_q."""
        g, cfg = self.g, self.cfg
        nh, kvh, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        wq = self._matrix(block.wq)
        if self.fold_scale and block.q_norm is None:
            wq = _scaled(wq, self.softmax_scale)
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
        """RMSNorm over each head of ``x`` ``[b, s, heads * head_dim]`` (qwen3)."""
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

    def _attention_gqa(self, i: int, block: LlamaBlock, x: str, bias: str) -> str:
        """RotaryEmbedding (honours ``position_ids``) + GroupQueryAttention.

        GQA's own rotary derives positions from ``seqlens_k`` and would be wrong for
        left-padded rows, so RoPE is applied beforehand. ``seqlens_k`` is ``total - 1`` for
        every row, which makes GQA's causal window index-based, and padding is masked by
        the shared additive bias, exactly like the ``ops`` path.
        """
        g, cfg = self.g, self.cfg
        nh, kvh = cfg.n_heads, cfg.n_kv_heads
        q, k, v = self._qkv(i, block, x)
        q = g.op1(
            "RotaryEmbedding",
            [q, POSITION_IDS, self.gqa_cos, self.gqa_sin],
            domain=MS_DOMAIN,
            num_heads=nh,
            interleaved=0,
        )
        k = g.op1(
            "RotaryEmbedding",
            [k, POSITION_IDS, self.gqa_cos, self.gqa_sin],
            domain=MS_DOMAIN,
            num_heads=kvh,
            interleaved=0,
        )
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
                bias,
            ],
            outputs=[f"layers.{i}/attn_ctx", present_key(i), present_value(i)],
            domain=MS_DOMAIN,
            num_heads=nh,
            kv_num_heads=kvh,
            do_rotary=0,
            scale=1.0 if self.fold_scale else self.softmax_scale,
            name=f"layers.{i}/GroupQueryAttention",
        )[0]
        return self.linear(ctx, [self._matrix(block.wo)], f"layers.{i}.attn.o")

    def _attention_bias(self, tiled: bool = True) -> str:
        """Additive bias ``[batch, 1, group * seq, total]``: 0 where allowed, else -1e9.

        Query ``i`` of this call sits at absolute cache index ``past + i``; it may see key
        ``j`` when ``j <= past + i`` and ``attention_mask[b, j] == 1``. Rows are tiled
        ``group`` times so one bias serves the grouped-query score layout.
        """
        g = self.g
        seq = g.op1("Gather", [g.op1("Shape", [POSITION_IDS]), g.i64(1)], axis=0)
        total = g.op1("Gather", [g.op1("Shape", [ATTENTION_MASK]), g.i64(1)], axis=0)
        past = g.op1("Sub", [total, seq])
        q_idx = g.op1("Unsqueeze", [g.op1("Range", [past, total, g.const(np.int64(1))]), g.i64(1)])
        k_idx = g.op1("Range", [g.const(np.int64(0)), total, g.const(np.int64(1))])
        causal = g.op1("LessOrEqual", [k_idx, q_idx])  # [seq, total]
        keep = g.op1("Cast", [ATTENTION_MASK], to=onnx.TensorProto.BOOL)
        keep = g.op1("Unsqueeze", [keep, g.i64(1, 2)])  # [batch, 1, 1, total]
        allowed = g.op1("And", [causal, keep])  # [batch, 1, seq, total]
        bias = g.op1("Where", [allowed, g.const(np.float32(0.0)), g.const(np.float32(MASK_VALUE))])
        if self.group == 1 or not tiled:
            return bias
        return g.op1("Tile", [bias, g.i64(1, 1, self.group, 1)], name="attn_bias/Tile")

    def _rope_rows(self) -> tuple[str, str]:
        """cos/sin rows ``[batch, seq, 1, head_dim]`` gathered once per graph."""
        g = self.g
        cos_t, sin_t = rope_tables(self.cfg)
        rows = []
        for name, table in (("rope.cos", cos_t), ("rope.sin", sin_t)):
            gathered = g.op1("Gather", [g.initializer(name, table), POSITION_IDS], axis=0)
            rows.append(g.op1("Unsqueeze", [gathered, g.i64(2)]))
        return rows[0], rows[1]

    def _rope(self, x: str, heads: int, cos: str, sin: str) -> str:
        """Rotate-half RoPE on ``[batch, seq, heads * head_dim]``, result ``[b, s, h, d]``."""
        g, hd = self.g, self.cfg.head_dim
        x4 = g.op1("Reshape", [x, g.i64(0, 0, heads, hd)])
        x1, x2 = g.op("Split", [x4, g.i64(hd // 2, hd // 2)], n_out=2, axis=-1)
        rotated = g.op1("Concat", [g.op1("Neg", [x2]), x1], axis=-1)
        return g.op1("Add", [g.op1("Mul", [x4, cos]), g.op1("Mul", [rotated, sin])])

    def _attention(self, i: int, block: LlamaBlock, x: str, bias: str, cos: str, sin: str) -> str:
        """Attention in standard ops; queries grouped per KV head, so K/V are never expanded."""
        g, cfg = self.g, self.cfg
        nh, kvh, hd, grp = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, self.group
        q, k, v = self._qkv(i, block, x)
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
        probs = g.op1("Softmax", [g.op1("Add", [scores, bias])], axis=-1)
        ctx = g.op1("MatMul", [probs, value])  # [b, kvh, grp * s, hd]
        ctx = g.op1("Reshape", [ctx, g.i64(0, kvh, grp, -1, hd)])
        ctx = g.op1("Transpose", [ctx], perm=[0, 3, 1, 2, 4])
        ctx = g.op1("Reshape", [ctx, g.i64(0, 0, nh * hd)])
        return self.linear(ctx, [self._matrix(block.wo)], f"layers.{i}.attn.o")

    def _mlp(self, i: int, block: LlamaBlock, x: str) -> str:
        g = self.g
        ffn = self.cfg.ffn
        gate_up = self.linear(
            x, [self._matrix(block.w_gate), self._matrix(block.w_up)], f"layers.{i}.mlp.gate_up"
        )
        gate, up = g.op("Split", [gate_up, g.i64(ffn, ffn)], n_out=2, axis=-1)
        act = g.op1("Mul", [g.op1("Mul", [gate, g.op1("Sigmoid", [gate])]), up])
        return self.linear(act, [self._matrix(block.w_down)], f"layers.{i}.mlp.down")

    def _q8_table(self, prefix: str, matrix: np.ndarray) -> Q8Table | None:
        """A Q8_0-exact table (the GGUF embedding) stays 8-bit in ``lossless4``: gathered as
        8-bit blocks, and as the head on MatMulNBits' int8 path (int8 activations or limbs)
        or, with fp32 activations, as two exact 4-bit halves (``Q8Table.matmul_fp32``)."""
        if self.variant != "lossless4":
            return None
        if prefix not in self.q8_tables:
            blocks = q8_0_blocks(matrix)
            self.q8_tables[prefix] = None if blocks is None else Q8Table(self.g, prefix, *blocks)
        return self.q8_tables[prefix]

    def _quant_table(self, prefix: str, matrix: Table) -> QuantTable | None:
        """A K-quant (or other non-Q8_0) table stays as its integers in ``lossless4``."""
        if self.variant != "lossless4" or isinstance(matrix, np.ndarray):
            return None
        if prefix not in self.quant_tables:
            self.quant_tables[prefix] = QuantTable(self.linear, prefix, matrix)
        return self.quant_tables[prefix]

    def _lm_head(self, x: str) -> None:
        g, cfg = self.g, self.cfg
        tied = self.w.lm_head is None
        head_table = self.w.token_embd if self.w.lm_head is None else self.w.lm_head
        prefix = "model.embed_tokens" if tied else "lm_head"
        quant = self._quant_table(prefix, head_table)
        if quant is not None:
            g.op("Identity", [quant.matmul(x)], outputs=[LOGITS], name="logits/Identity")
            g.add_output(LOGITS, F32, ["batch_size", "sequence_length", cfg.vocab])
            return
        head = as_float(head_table)
        table = self._q8_table(prefix, head)
        if table is not None:
            if self.linear.use_limbs:
                out = self.linear.sum_limbs(table.matmul(self.linear.limbs(x, cfg.hidden), 4))
            elif self.linear.accuracy_level == 4:
                out = table.matmul(x, 4)
            else:
                out = table.matmul_fp32(x)
            g.op("Identity", [out], outputs=[LOGITS], name="logits/Identity")
        else:
            name = f"{prefix}.weight"
            if not any(t.name == name for t in g.initializers):
                g.initializer(name, head)
            flat = g.op1("Reshape", [x, g.i64(-1, cfg.hidden)])
            logits = g.op1("Gemm", [flat, name], transB=1, name="lm_head/Gemm")
            shape = g.op1("Shape", [POSITION_IDS])
            out_shape = g.op1("Concat", [shape, g.i64(cfg.vocab)], axis=0)
            g.op("Reshape", [logits, out_shape], outputs=[LOGITS], name="logits/Reshape")
        g.add_output(LOGITS, F32, ["batch_size", "sequence_length", cfg.vocab])


def build_shard(
    weights: LlamaWeights,
    layers: LayerRange,
    variant: Variant = "fp32",
    int8_activations: bool = False,
    attention: Attention = "gqa",
    int8_limbs: bool = False,
) -> onnx.ModelProto:
    """Graph over blocks ``layers``; its role (first/middle/last/full) follows the range.

    ``attention="gqa"`` uses com.microsoft RotaryEmbedding + GroupQueryAttention (half the
    nodes per block); ``"ops"`` spells attention out in standard ONNX ops. Both are
    tested against the reference. ``int8_limbs`` (lossless4 with fp32 activations) runs
    the 4-bit matmuls on the int8 kernel with exact activation limbs (``Linear.limbs``).
    """
    builder = _Builder(
        _prepare(weights, variant), layers, variant, int8_activations, attention, int8_limbs
    )
    return builder.build()


def build_decoder(
    weights: LlamaWeights,
    variant: Variant = "fp32",
    int8_activations: bool = False,
    attention: Attention = "gqa",
    int8_limbs: bool = False,
) -> onnx.ModelProto:
    """The full decoder: ``input_ids`` + KV cache in, ``logits`` + present KV out."""
    layers = LayerRange(0, weights.config.n_layers)
    return build_shard(weights, layers, variant, int8_activations, attention, int8_limbs)
