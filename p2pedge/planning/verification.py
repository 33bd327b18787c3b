"""How strictly a client checks its shard servers' outputs (pure; the checking itself is
``protocols/pipeline/verify.py``)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

# Relative tolerance per wire dtype: float32 covers thread counts and kernel choices;
# float16 one rounding step more; int8 kernels quantise activations per step, and one
# value rounding the other way moves an output by a quantisation step.
RTOL = {"float32": 1e-3, "float16": 4e-3}
RTOL_QUANTIZED = 3e-2


def tolerance_for(dtype: str, *, quantized: bool = False) -> float:
    """The relative tolerance that honest arithmetic in ``dtype`` stays within."""
    base = RTOL.get(dtype, RTOL["float16"])
    return max(base, RTOL_QUANTIZED) if quantized else base


@dataclass(frozen=True)
class VerifyPolicy:
    """How often and how strictly a client checks its shard servers.

    ``fraction``: the chance that a token triggers a check (0 checks nothing, not even at
    the end); every generation is also checked at its end, so every token delivered was
    verified. ``first`` checks the first token too, which covers the whole prompt: a
    server that corrupts every step is caught before a token is delivered. ``rtol``
    (None: :func:`tolerance_for` the session's wire dtype) and ``atol`` bound ``max
    |served - recomputed|`` per position by ``atol + rtol * max |recomputed|``. ``seed``
    makes the check schedule reproducible (None: unpredictable, which is what a server
    must face)."""

    fraction: float = 1 / 20
    rtol: float | None = None
    atol: float = 1e-4
    quantized: bool = False
    first: bool = True
    seed: int | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.fraction <= 1.0:
            raise ValueError(f"fraction must be in [0, 1], got {self.fraction}")
        for name in ("rtol", "atol"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and 0.0 <= value < 1.0):
                raise ValueError(f"{name} must be in [0, 1), got {value}")

    def tolerance(self, dtype: str) -> float:
        return (
            self.rtol if self.rtol is not None else tolerance_for(dtype, quantized=self.quantized)
        )


def first_mismatch(
    served: npt.NDArray[Any], recomputed: npt.NDArray[Any], atol: float, rtol: float
) -> int | None:
    """The first position (row of ``[n, width]``) where the two differ beyond the tolerance;
    NaN or inf anywhere counts as different."""
    a = np.asarray(served, dtype=np.float32).reshape(recomputed.shape[0], -1)
    b = np.asarray(recomputed, dtype=np.float32).reshape(recomputed.shape[0], -1)
    diff = np.abs(a - b).max(axis=1, initial=0.0)
    bound = atol + rtol * np.abs(b).max(axis=1, initial=0.0)
    bad = np.flatnonzero(~(diff <= bound))  # NaN compares false: bad
    return int(bad[0]) if bad.size else None
