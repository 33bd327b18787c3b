"""Picking the next token from logits: greedy, or seeded temperature / top-k / top-p.

Pure numpy. The random draw for a token is fixed by the seed and the token's position
(:func:`uniform`), not by a generator's running state: a ring's last server can sample
from nothing but the :class:`SamplingSpec` it was sent, and the client, a ring that broke
off, a replay after recovery and a run without failures all pick the same tokens.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from p2pedge.runtime.sampling import (
    MAX_SEED,
    MAX_TEMPERATURE,
    MAX_TOP_K,
    MIN_TEMPERATURE,
    check_sampling,
)

__all__ = [
    "GREEDY",
    "MAX_SEED",
    "MAX_TEMPERATURE",
    "MAX_TOP_K",
    "MIN_TEMPERATURE",
    "SEED_BITS",
    "Sampler",
    "SamplingSpec",
    "greedy",
    "logits_needed",
    "make_sampler",
    "pick",
    "spec_from",
    "uniform",
]

SEED_BITS = MAX_SEED.bit_length()  # seeds are in [0, 2**SEED_BITS)


@dataclass(frozen=True)
class SamplingSpec:
    """How to pick a token; a temperature under :data:`MIN_TEMPERATURE` is greedy (the
    other fields are then unused). The ranges are those of local generation and the
    infer protocol (:func:`~p2pedge.runtime.sampling.check_sampling`)."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.seed is None:
            raise ValueError("a sampling spec needs a seed (0 when the caller gave none)")
        check_sampling(self.temperature, self.top_p, self.top_k, self.seed)

    @property
    def greedy(self) -> bool:
        return self.temperature < MIN_TEMPERATURE


def uniform(seed: int, position: int) -> float:
    """A draw in [0, 1) fixed by ``(seed, position)``: counter-based, so nothing to carry."""
    digest = hashlib.blake2b(struct.pack("<QQ", seed, position), digest_size=8).digest()
    return (int.from_bytes(digest, "little") >> 11) / float(1 << 53)


def pick(logits: npt.NDArray[np.float32], spec: SamplingSpec, position: int) -> int:
    """The token at ``position`` from last-position ``logits`` (any shape of one row).

    Greedy takes the argmax (the lower id on ties). Otherwise: divide by the temperature,
    keep the ``top_k`` largest, then the smallest set reaching ``top_p``, and invert the
    cumulative distribution at :func:`uniform`.
    """
    row = np.asarray(logits).reshape(-1)
    if spec.greedy:
        return int(np.argmax(row))
    z = row.astype(np.float64) / spec.temperature
    if 0 < spec.top_k < z.size:
        z[z < np.partition(z, -spec.top_k)[-spec.top_k]] = -np.inf
    p = np.exp(z - z.max())
    p /= p.sum()
    if spec.top_p < 1.0:
        order = np.argsort(-p, kind="stable")
        keep = np.cumsum(p[order]) - p[order] < spec.top_p  # smallest set reaching top_p
        mask = np.zeros_like(p, dtype=bool)
        mask[order[keep]] = True
        p = np.where(mask, p, 0.0)
    cdf = np.cumsum(p)
    index = int(np.searchsorted(cdf, uniform(spec.seed, position) * cdf[-1], side="right"))
    return min(index, int(np.flatnonzero(p)[-1]))  # rounding at the very top end


GREEDY = SamplingSpec()


class Sampler:
    """Picks the token at a position; its :attr:`spec` can travel to a ring's last server."""

    def __init__(self, spec: SamplingSpec) -> None:
        self.spec = spec

    def __call__(self, logits: npt.NDArray[np.float32], position: int) -> int:
        return pick(logits, self.spec, position)


greedy = Sampler(GREEDY)


def logits_needed(temperature: float, top_k: int) -> int:
    """How many of the largest logits a sampler needs to pick what it would pick from all."""
    if temperature < MIN_TEMPERATURE:
        return 1
    return top_k if top_k > 0 else 0


def spec_from(temperature: object, top_k: object, top_p: object, seed: object) -> SamplingSpec:
    """The sampled spec a peer sent: ``ValueError`` unless each value is in the shared
    range, the floats are floats and it is not greedy (a greedy ring sends no spec)."""
    if not isinstance(temperature, float) or not isinstance(top_p, float):
        raise ValueError("temperature and top_p must be floats")
    t, p, k, s = check_sampling(temperature, top_p, top_k, seed)
    if s is None or t < MIN_TEMPERATURE:
        raise ValueError("a sampling spec needs a seed and a temperature (greedy sends none)")
    return SamplingSpec(t, k, p, s)


def make_sampler(
    temperature: float = 1.0, top_k: int = 0, seed: int = 0, top_p: float = 1.0
) -> Sampler:
    """Temperature / top-k / top-p sampling, reproducible from ``seed``."""
    return Sampler(SamplingSpec(float(temperature), top_k, float(top_p), seed))
