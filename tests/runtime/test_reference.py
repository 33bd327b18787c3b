"""Properties of the numpy reference itself (it is the yardstick for every graph)."""

from __future__ import annotations

import dataclasses

import numpy as np

from p2pedge.models.convert.weights import Q4_1Matrix
from p2pedge.runtime.reference import ReferenceLlama
from p2pedge.testing import random_llama_weights, tiny_config, tiny_weights

IDS = np.array([[1, 120, 118, 264, 13, 75, 351, 111]], dtype=np.int64)
POS = np.arange(IDS.shape[1])[None]


def test_incremental_decode_equals_full_prefill() -> None:
    ref = ReferenceLlama(tiny_weights(seed=1))
    full = ref.forward(IDS, POS, ref.new_cache())
    cache = ref.new_cache()
    steps = [ref.forward(IDS[:, i : i + 1], POS[:, i : i + 1], cache) for i in range(IDS.shape[1])]
    assert np.allclose(np.concatenate(steps, axis=1), full, atol=1e-9)
    assert cache.length() == IDS.shape[1]


def test_causality_future_tokens_do_not_change_past_logits() -> None:
    ref = ReferenceLlama(tiny_weights(seed=1))
    a = ref.forward(IDS, POS, ref.new_cache())
    changed = IDS.copy()
    changed[0, -1] = 7
    b = ref.forward(changed, POS, ref.new_cache())
    assert np.array_equal(a[:, :-1], b[:, :-1])
    assert not np.allclose(a[:, -1], b[:, -1])


def test_masked_keys_are_ignored() -> None:
    ref = ReferenceLlama(tiny_weights(seed=1))
    want = ref.forward(IDS[:, 3:], np.arange(5)[None], ref.new_cache())
    padded = IDS.copy()
    padded[0, :3] = 0
    mask = np.array([[0, 0, 0, 1, 1, 1, 1, 1]], dtype=np.int64)
    pos = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
    got = ref.forward(padded, pos, ref.new_cache(), attention_mask=mask)
    assert np.allclose(got[:, 3:], want, atol=1e-9)


def test_gqa_equals_mha_with_duplicated_kv_heads() -> None:
    """Grouped-query attention is MHA whose K/V heads are repeated per group."""
    cfg = tiny_config(n_layers=2)
    w = random_llama_weights(cfg, seed=4, quantize_q4_1=False)
    grp = cfg.n_heads // cfg.n_kv_heads
    blocks = []
    for b in w.blocks:
        assert not isinstance(b.wk, Q4_1Matrix) and not isinstance(b.wv, Q4_1Matrix)
        dup = [
            np.repeat(m.reshape(cfg.n_kv_heads, cfg.head_dim, -1), grp, axis=0)
            for m in (b.wk, b.wv)
        ]
        blocks.append(
            dataclasses.replace(
                b, wk=dup[0].reshape(-1, cfg.hidden), wv=dup[1].reshape(-1, cfg.hidden)
            )
        )
    mha = dataclasses.replace(
        w, config=dataclasses.replace(cfg, n_kv_heads=cfg.n_heads), blocks=tuple(blocks)
    )
    a = ReferenceLlama(w).forward(IDS, POS, ReferenceLlama(w).new_cache())
    b = ReferenceLlama(mha).forward(IDS, POS, ReferenceLlama(mha).new_cache())
    assert np.allclose(a, b, atol=1e-9)


def test_q4_1_dequantisation_matches_block_formula() -> None:
    w = tiny_weights(seed=0, n_layers=1)
    m = w.blocks[0].wq
    assert isinstance(m, Q4_1Matrix)
    dense = m.dequantize()
    q = np.concatenate([m.quants & 0x0F, m.quants >> 4], axis=-1).astype(np.float32)
    row, blk, j = 3, 1, 20
    assert dense[row, blk * 32 + j] == m.scales[row, blk] * q[row, blk, j] + m.mins[row, blk]


def test_greedy_is_varied() -> None:
    out = ReferenceLlama(tiny_weights(seed=0)).greedy([1, 120, 118, 264, 13], 16)
    assert len(set(out)) > 4
