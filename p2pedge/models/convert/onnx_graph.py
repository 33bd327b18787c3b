"""ONNX decoder graphs for Llama-family weights: the full model and block-range shards.

One builder serves both: a shard is a graph over blocks ``[start, end)`` whose input is
``input_ids`` when it starts at block 0 (embedding included) and ``hidden_states``
otherwise, and whose output is ``logits`` when it ends at the last block (final norm and
LM head included) and a hidden-state tensor otherwise. The full decoder is the shard that
covers every block, so the two can never drift apart numerically. Attention (masks,
rotary, Q/K/V, GQA or plain ops) is in :mod:`.onnx_attention`.

Layout choices, all checked against :mod:`p2pedge.runtime.reference`: Q/K/V and gate/up
are fused into one matmul each; RMSNorm + residual use com.microsoft
SkipSimplifiedLayerNormalization; a power-of-two softmax scale (head_dim 16, 64, 256) is
folded into W_q exactly (into the Q norm for qwen3 and gemma3); in ``lossless4`` every
quantised GGUF matrix maps onto MatMulNBits as its integers (see ``Linear`` and
``quants``), the Q8_0 embedding doubles as an exact LM head (8-bit on the int8 path, two
4-bit halves with fp32 activations; see ``Q8Table``) and other quantised tables stay
integers (``QuantTable``). Gemma adds an embedding scale, post-attention and post-MLP
norms, GeGLU (FastGelu, the tanh form) and soft-capped logits.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import onnx

from p2pedge.ids import LayerRange
from p2pedge.models.convert.onnx_attention import (
    ATTENTION_MASK,
    HIDDEN_IN,
    HIDDEN_OUT_FIRST,
    HIDDEN_OUT_MIDDLE,
    INPUT_IDS,
    LOGITS,
    MASK_VALUE,
    POSITION_IDS,
    Attention,
    AttentionBuilder,
    as_attention,
    exact_power_of_two,
    past_key,
    past_value,
    present_key,
    present_value,
    rope_tables,
)
from p2pedge.models.convert.onnx_ops import F32, I64, MS_DOMAIN, GraphBuilder, Linear
from p2pedge.models.convert.tables import Q8Table, QuantTable, q8_0_blocks
from p2pedge.models.convert.weights import LlamaBlock, LlamaWeights, Table, as_float

Variant = Literal["fp32", "lossless4"]
VARIANTS: tuple[Variant, ...] = ("fp32", "lossless4")


def as_variant(name: str) -> Variant:
    """Validate a variant name read from a file or command line."""
    for v in VARIANTS:
        if v == name:
            return v
    raise ValueError(f"unknown variant {name!r}; expected one of {VARIANTS}")


class _Builder(AttentionBuilder):
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
        as_variant(variant)
        if layers.end > cfg.n_layers:
            raise ValueError(f"layer range {layers} exceeds {cfg.n_layers} blocks")
        if int8_limbs and (int8_activations or variant != "lossless4"):
            raise ValueError("int8 limbs apply to lossless4 with fp32 activations only")
        g = GraphBuilder(f"p2pedge_llama_{layers}")
        linear = Linear(g, 4 if int8_activations else 0, limbs=int8_limbs)
        super().__init__(weights, layers, attention, linear, variant == "fp32")
        self.variant = variant
        self.first = layers.start == 0
        self.last = layers.end == cfg.n_layers
        self.q8_tables: dict[str, Q8Table | None] = {}
        self.quant_tables: dict[str, QuantTable] = {}

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

        hidden = self._embed(ids) if self.first else hidden_in
        if self.use_gqa:
            self._gqa_inputs()

        start_norm = self._blk(0).attn_norm
        if self.first:
            normed = self._norm(hidden, start_norm, f"layers.{self.layers.start}.attn_norm")
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
            attn = self.attention(i, block, normed)
            if block.attn_post_norm is not None:
                attn = self._norm(attn, block.attn_post_norm, f"layers.{i}.attn_post_norm")
            normed, residual = self._skip_norm(
                attn, residual, block.ffn_norm, f"layers.{i}.ffn_norm"
            )
            mlp = self._mlp(i, block, normed)
            if block.ffn_post_norm is not None:
                mlp = self._norm(mlp, block.ffn_post_norm, f"layers.{i}.ffn_post_norm")
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

    def _embed(self, ids: str) -> str:
        g = self.g
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
        if self.cfg.embed_scale != 1.0:  # Gemma: times sqrt(hidden), in float32 as llama.cpp
            scale = g.const(np.float32(self.cfg.embed_scale))
            hidden = g.op1("Mul", [hidden, scale], name="embed/scale")
        return hidden

    def _blk(self, offset: int) -> LlamaBlock:
        return self.w.blocks[self.layers.start + offset]

    def _norm(self, x: str, gamma: np.ndarray, name: str) -> str:
        return self.g.op1(
            "SimplifiedLayerNormalization",
            [x, self.g.initializer(name, gamma)],
            axis=-1,
            epsilon=self.cfg.rms_eps,
            name=name,
        )

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

    def _mlp(self, i: int, block: LlamaBlock, x: str) -> str:
        """Gated MLP: SwiGLU, or GeGLU with the tanh GELU (FastGelu) for Gemma."""
        g = self.g
        ffn = self.cfg.ffn
        gate_up = self.linear(
            x, [self._matrix(block.w_gate), self._matrix(block.w_up)], f"layers.{i}.mlp.gate_up"
        )
        gate, up = g.op("Split", [gate_up, g.i64(ffn, ffn)], n_out=2, axis=-1)
        if self.cfg.activation == "gelu_tanh":
            active = g.op1("FastGelu", [gate], domain=MS_DOMAIN)
        else:
            active = g.op1("Mul", [gate, g.op1("Sigmoid", [gate])])
        act = g.op1("Mul", [active, up])
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

    def _head(self, x: str, prefix: str, head_table: Table) -> str:
        g, cfg = self.g, self.cfg
        quant = self._quant_table(prefix, head_table)
        if quant is not None:
            return quant.matmul(x)
        head = as_float(head_table)
        table = self._q8_table(prefix, head)
        if table is not None:
            if self.linear.use_limbs:
                return self.linear.sum_limbs(table.matmul(self.linear.limbs(x, cfg.hidden), 4))
            if self.linear.accuracy_level == 4:
                return table.matmul(x, 4)
            return table.matmul_fp32(x)
        name = f"{prefix}.weight"
        if not any(t.name == name for t in g.initializers):
            g.initializer(name, head)
        flat = g.op1("Reshape", [x, g.i64(-1, cfg.hidden)])
        logits = g.op1("Gemm", [flat, name], transB=1, name="lm_head/Gemm")
        shape = g.op1("Shape", [POSITION_IDS])
        out_shape = g.op1("Concat", [shape, g.i64(cfg.vocab)], axis=0)
        return g.op1("Reshape", [logits, out_shape], name="logits/Reshape")

    def _lm_head(self, x: str) -> None:
        g, cfg = self.g, self.cfg
        tied = self.w.lm_head is None
        head_table = self.w.token_embd if self.w.lm_head is None else self.w.lm_head
        out = self._head(x, "model.embed_tokens" if tied else "lm_head", head_table)
        if cfg.final_softcap > 0:
            out = self.softcap(out, cfg.final_softcap, "logits/softcap")
        g.op("Identity", [out], outputs=[LOGITS], name="logits/Identity")
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
    builder = _Builder(weights, layers, variant, int8_activations, attention, int8_limbs)
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


__all__ = [
    "ATTENTION_MASK",
    "HIDDEN_IN",
    "HIDDEN_OUT_FIRST",
    "HIDDEN_OUT_MIDDLE",
    "INPUT_IDS",
    "LOGITS",
    "MASK_VALUE",
    "POSITION_IDS",
    "VARIANTS",
    "Attention",
    "Variant",
    "as_attention",
    "as_variant",
    "build_decoder",
    "build_shard",
    "exact_power_of_two",
    "past_key",
    "past_value",
    "present_key",
    "present_value",
    "rope_tables",
]
