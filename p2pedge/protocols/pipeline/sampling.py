"""Picking the next token from logits: greedy, or seeded temperature / top-k / top-p.

Pure numpy. A last shard can send only the top-k logits a sampler needs
(:func:`logits_needed`), and greedy decoding can run without the client in the loop
(``codec.Ring``), which is why greedy is a named function callers can test for.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import numpy.typing as npt

Sampler = Callable[[npt.NDArray[np.float32]], int]


def greedy(logits: npt.NDArray[np.float32]) -> int:
    return int(np.argmax(logits))


def logits_needed(temperature: float, top_k: int) -> int:
    """How many of the largest logits a sampler needs to pick what it would pick from all."""
    if temperature <= 0:
        return 1
    return top_k if top_k > 0 else 0


def make_sampler(
    temperature: float = 1.0, top_k: int = 0, seed: int = 0, top_p: float = 1.0
) -> Sampler:
    """Temperature / top-k / top-p sampling with its own seeded generator (reproducible)."""
    rng = np.random.default_rng(seed)

    def sample(logits: npt.NDArray[np.float32]) -> int:
        if temperature <= 0:
            return greedy(logits)
        z = logits.astype(np.float64) / temperature
        if 0 < top_k < z.size:
            z[z < np.partition(z, -top_k)[-top_k]] = -np.inf
        p = np.exp(z - z.max())
        p /= p.sum()
        if top_p < 1.0:
            order = np.argsort(-p)
            keep = np.cumsum(p[order]) - p[order] < top_p  # smallest set reaching top_p
            mask = np.zeros_like(p, dtype=bool)
            mask[order[keep]] = True
            p = np.where(mask, p, 0.0)
            p /= p.sum()
        return int(rng.choice(z.size, p=p))

    return sample
