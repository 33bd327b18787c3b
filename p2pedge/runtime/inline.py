"""Whether the next decode step may run on the caller's (event-loop) thread. Pure.

Handing a short step to a worker thread and back costs two thread wake-ups: 0.4-0.9 ms
per shard hop on a 2-vCPU VM (``benchmarks/transport.py``), and 0.4-0.5 ms of a 14 ms
SmolLM2 token in local generation (one-off, 2026-12-04). Where the engine holds the GIL for
the whole call anyway (onnxruntime-genai 0.18), the worker thread does not even free the
event loop meanwhile. A step whose recent cost is within a budget may run inline instead;
the budget caps how long the loop can stall, and a model that suddenly slows stalls it
once, then its estimate moves it back to a thread.
"""

from __future__ import annotations

from collections.abc import Hashable

DEFAULT_INLINE_STEP_S = 0.05
COST_SMOOTHING = 0.3  # weight of the newest decode step in a model's cost estimate


class StepCosts:
    """Recent decode-step seconds per model (any hashable key), and whether the next one
    may run inline.

    Only one-position steps count and qualify: a prefill chunk's cost grows with its
    length, so it always goes to a worker thread. A model with no measured step yet is
    never inlined, so the first decode step of a slow model cannot stall the loop.
    """

    def __init__(self, inline_budget_s: float) -> None:
        if inline_budget_s < 0:
            raise ValueError(f"inline step budget must be >= 0, got {inline_budget_s}")
        self.inline_budget_s = inline_budget_s
        self._decode_s: dict[Hashable, float] = {}

    def record(self, model: Hashable, positions: int, seconds: float) -> None:
        if positions != 1:
            return
        old = self._decode_s.get(model)
        self._decode_s[model] = seconds if old is None else old + COST_SMOOTHING * (seconds - old)

    def estimate(self, model: Hashable) -> float | None:
        return self._decode_s.get(model)

    def may_inline(self, model: Hashable, positions: int, *, busy: bool) -> bool:
        if busy or positions != 1:
            return False
        cost = self._decode_s.get(model)
        return cost is not None and cost <= self.inline_budget_s
