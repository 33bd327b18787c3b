"""Plain-numpy Llama forward pass with a KV cache: the definition of correct output.

Covers the ``llama``, ``qwen2`` (Q/K/V biases) and ``qwen3`` (per-head Q/K norms)
architectures.

Written for clarity, not speed: float64 throughout, weights dequantised once with
``as_float``, heads expanded explicitly for grouped-query attention. Every ONNX graph the
project builds (full decoder, shards, both variants) is tested against this.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from p2pedge.models.convert.weights import LlamaWeights, as_float

F64 = npt.NDArray[np.float64]
# Finite so a fully padded query row yields a uniform (ignored) row instead of NaNs.
MASK_VALUE = -1.0e9


@dataclass
class KVCache:
    """Per-block keys/values ``[batch, n_kv_heads, seq, head_dim]`` for the tokens seen."""

    keys: list[F64 | None] = field(default_factory=list)
    values: list[F64 | None] = field(default_factory=list)

    def length(self) -> int:
        first = self.keys[0] if self.keys else None
        return 0 if first is None else int(first.shape[2])


class ReferenceLlama:
    def __init__(self, weights: LlamaWeights) -> None:
        cfg = weights.config
        self.config = cfg
        self.embd = as_float(weights.token_embd).astype(np.float64)
        head = weights.lm_head if weights.lm_head is not None else weights.token_embd
        self.head = as_float(head).astype(np.float64)
        self.output_norm = weights.output_norm.astype(np.float64)
        self.blocks = [
            {
                "attn_norm": b.attn_norm.astype(np.float64),
                "wq": as_float(b.wq).astype(np.float64),
                "wk": as_float(b.wk).astype(np.float64),
                "wv": as_float(b.wv).astype(np.float64),
                "wo": as_float(b.wo).astype(np.float64),
                "ffn_norm": b.ffn_norm.astype(np.float64),
                "w_gate": as_float(b.w_gate).astype(np.float64),
                "w_up": as_float(b.w_up).astype(np.float64),
                "w_down": as_float(b.w_down).astype(np.float64),
                **{
                    name: np.zeros(1) if bias is None else bias.astype(np.float64)
                    for name, bias in (("bq", b.bq), ("bk", b.bk), ("bv", b.bv))
                },
            }
            for b in weights.blocks
        ]
        self.head_norms: list[tuple[F64 | None, F64 | None]] = [
            (
                None if b.q_norm is None else b.q_norm.astype(np.float64),
                None if b.k_norm is None else b.k_norm.astype(np.float64),
            )
            for b in weights.blocks
        ]
        self.inv_freq = cfg.inv_freq()

    def new_cache(self) -> KVCache:
        n = self.config.n_layers
        return KVCache(keys=[None] * n, values=[None] * n)

    def _norm(self, x: F64, gamma: F64) -> F64:
        rms = np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + self.config.rms_eps)
        out: F64 = x / rms * gamma
        return out

    def _rope(self, x: F64, positions: npt.NDArray[np.int64]) -> F64:
        """``x`` is ``[batch, heads, seq, head_dim]``; rotate-half convention."""
        angles = positions[:, None, :, None].astype(np.float64) * self.inv_freq
        angles = np.concatenate([angles, angles], axis=-1)  # [b, 1, s, hd]
        half = x.shape[-1] // 2
        rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
        out: F64 = x * np.cos(angles) + rotated * np.sin(angles)
        return out

    def forward(
        self,
        input_ids: npt.NDArray[np.int64],
        positions: npt.NDArray[np.int64],
        kv_cache: KVCache,
        attention_mask: npt.NDArray[np.int64] | None = None,
    ) -> F64:
        """Logits ``[batch, seq, vocab]`` for ``input_ids`` ``[batch, seq]``; extends ``kv_cache``.

        ``attention_mask`` covers cached plus new tokens (``[batch, past + seq]``); None means
        all ones.
        """
        return self.forward_hidden(
            self.embd[input_ids], positions, kv_cache, attention_mask, 0, None, True
        )

    def forward_hidden(
        self,
        hidden: F64,
        positions: npt.NDArray[np.int64],
        kv_cache: KVCache,
        attention_mask: npt.NDArray[np.int64] | None,
        start: int,
        end: int | None,
        final: bool,
    ) -> F64:
        """Run blocks ``[start, end)`` on ``hidden``; with ``final`` apply norm and LM head."""
        cfg = self.config
        end = cfg.n_layers if end is None else end
        batch, seq = positions.shape
        cached = kv_cache.keys[start]
        past = 0 if cached is None else int(cached.shape[2])
        total = past + seq
        mask = np.ones((batch, total), dtype=np.int64) if attention_mask is None else attention_mask
        causal = np.arange(total)[None, :] <= (past + np.arange(seq))[:, None]  # [s, t]
        allowed = causal[None, None] & (mask[:, None, None, :] != 0)  # [b, 1, s, t]
        grp = cfg.n_heads // cfg.n_kv_heads
        x = hidden.astype(np.float64)
        for i in range(start, end):
            b = self.blocks[i]
            h = self._norm(x, b["attn_norm"])
            q = (
                (h @ b["wq"].T + b["bq"])
                .reshape(batch, seq, cfg.n_heads, cfg.head_dim)
                .transpose(0, 2, 1, 3)
            )
            k = (
                (h @ b["wk"].T + b["bk"])
                .reshape(batch, seq, cfg.n_kv_heads, cfg.head_dim)
                .transpose(0, 2, 1, 3)
            )
            v = (
                (h @ b["wv"].T + b["bv"])
                .reshape(batch, seq, cfg.n_kv_heads, cfg.head_dim)
                .transpose(0, 2, 1, 3)
            )
            q_norm, k_norm = self.head_norms[i]
            if q_norm is not None and k_norm is not None:  # qwen3: per-head norms
                q, k = self._norm(q, q_norm), self._norm(k, k_norm)
            q, k = self._rope(q, positions), self._rope(k, positions)
            old_k, old_v = kv_cache.keys[i], kv_cache.values[i]
            if old_k is not None and old_v is not None:
                k = np.concatenate([old_k, k], axis=2)
                v = np.concatenate([old_v, v], axis=2)
            kv_cache.keys[i], kv_cache.values[i] = k, v
            k_full = np.repeat(k, grp, axis=1)
            v_full = np.repeat(v, grp, axis=1)
            scores = q @ k_full.transpose(0, 1, 3, 2) / np.sqrt(cfg.head_dim)
            scores = np.where(allowed, scores, MASK_VALUE)
            scores = scores - scores.max(axis=-1, keepdims=True)
            probs = np.exp(scores)
            probs /= probs.sum(axis=-1, keepdims=True)
            ctx = (probs @ v_full).transpose(0, 2, 1, 3).reshape(batch, seq, -1)
            x = x + ctx @ b["wo"].T
            h = self._norm(x, b["ffn_norm"])
            gate = h @ b["w_gate"].T
            act = gate / (1.0 + np.exp(-gate)) * (h @ b["w_up"].T)
            x = x + act @ b["w_down"].T
        if not final:
            return x
        return self._norm(x, self.output_norm) @ self.head.T

    def greedy(self, prompt: list[int], max_new_tokens: int) -> list[int]:
        """Greedy continuation of ``prompt`` (batch 1), for end-to-end checks."""
        cache = self.new_cache()
        ids = np.array([prompt], dtype=np.int64)
        pos = np.arange(len(prompt), dtype=np.int64)[None]
        out: list[int] = []
        for _ in range(max_new_tokens):
            logits = self.forward(ids, pos, cache)
            nxt = int(np.argmax(logits[0, -1]))
            out.append(nxt)
            ids = np.array([[nxt]], dtype=np.int64)
            pos = np.array([[cache.length()]], dtype=np.int64)
        return out


def gelu_tanh(x: F64) -> F64:
    out: F64 = 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))
    return out


class GemmaReference(ReferenceLlama):
    """The numpy reference plus Gemma's features, each read from the config or block."""

    def __init__(self, weights: LlamaWeights) -> None:
        super().__init__(weights)
        cfg = weights.config
        self.embd = self.embd * cfg.embed_scale
        self.post_norms = [
            (
                None if b.attn_post_norm is None else b.attn_post_norm.astype(np.float64),
                None if b.ffn_post_norm is None else b.ffn_post_norm.astype(np.float64),
            )
            for b in weights.blocks
        ]
        self.inv_freqs = [cfg.inv_freq(cfg.is_swa(i)) for i in range(cfg.n_layers)]
        self.window = [cfg.sliding_window if cfg.is_swa(i) else 0 for i in range(cfg.n_layers)]
        self.attn_softcap, self.final_softcap = cfg.attn_softcap, cfg.final_softcap
        self.act = gelu_tanh if cfg.activation == "gelu_tanh" else (lambda g: g / (1 + np.exp(-g)))

    def _rope_at(self, x: F64, positions: npt.NDArray[np.int64], inv_freq: F64) -> F64:
        angles = positions[:, None, :, None].astype(np.float64) * inv_freq
        angles = np.concatenate([angles, angles], axis=-1)
        half = x.shape[-1] // 2
        rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
        out: F64 = x * np.cos(angles) + rotated * np.sin(angles)
        return out

    def forward_hidden(
        self,
        hidden: F64,
        positions: npt.NDArray[np.int64],
        kv_cache: KVCache,
        attention_mask: npt.NDArray[np.int64] | None,
        start: int,
        end: int | None,
        final: bool,
    ) -> F64:
        cfg = self.config
        end = cfg.n_layers if end is None else end
        batch, seq = positions.shape
        cached = kv_cache.keys[start]
        past = 0 if cached is None else int(cached.shape[2])
        total = past + seq
        mask = np.ones((batch, total), dtype=np.int64) if attention_mask is None else attention_mask
        distance = (past + np.arange(seq))[:, None] - np.arange(total)[None, :]  # [s, t]
        grp = cfg.n_heads // cfg.n_kv_heads
        x = hidden.astype(np.float64)

        def heads(y: F64, n: int) -> F64:
            return y.reshape(batch, seq, n, cfg.head_dim).transpose(0, 2, 1, 3)

        for i in range(start, end):
            b = self.blocks[i]
            h = self._norm(x, b["attn_norm"])
            q = heads(h @ b["wq"].T + b["bq"], cfg.n_heads)
            k = heads(h @ b["wk"].T + b["bk"], cfg.n_kv_heads)
            v = heads(h @ b["wv"].T + b["bv"], cfg.n_kv_heads)
            q_norm, k_norm = self.head_norms[i]
            if q_norm is not None and k_norm is not None:
                q, k = self._norm(q, q_norm), self._norm(k, k_norm)
            q = self._rope_at(q, positions, self.inv_freqs[i])
            k = self._rope_at(k, positions, self.inv_freqs[i])
            old_k, old_v = kv_cache.keys[i], kv_cache.values[i]
            if old_k is not None and old_v is not None:
                k = np.concatenate([old_k, k], axis=2)
                v = np.concatenate([old_v, v], axis=2)
            kv_cache.keys[i], kv_cache.values[i] = k, v
            allowed = distance >= 0
            if self.window[i]:
                allowed = allowed & (distance < self.window[i])
            allowed = allowed[None, None] & (mask[:, None, None, :] != 0)
            scores = q @ np.repeat(k, grp, axis=1).transpose(0, 1, 3, 2) * cfg.softmax_scale()
            if self.attn_softcap > 0:
                scores = self.attn_softcap * np.tanh(scores / self.attn_softcap)
            scores = np.where(allowed, scores, MASK_VALUE)
            probs = np.exp(scores - scores.max(axis=-1, keepdims=True))
            probs /= probs.sum(axis=-1, keepdims=True)
            ctx = (probs @ np.repeat(v, grp, axis=1)).transpose(0, 2, 1, 3).reshape(batch, seq, -1)
            attn_post, ffn_post = self.post_norms[i]
            out = ctx @ b["wo"].T
            x = x + (out if attn_post is None else self._norm(out, attn_post))
            h = self._norm(x, b["ffn_norm"])
            mlp = (self.act(h @ b["w_gate"].T) * (h @ b["w_up"].T)) @ b["w_down"].T
            x = x + (mlp if ffn_post is None else self._norm(mlp, ffn_post))
        if not final:
            return x
        logits: F64 = self._norm(x, self.output_norm) @ self.head.T
        if self.final_softcap > 0:
            logits = self.final_softcap * np.tanh(logits / self.final_softcap)
        return logits
