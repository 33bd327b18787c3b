"""Which specialist comes next: a decayed Markov chain over categories plus frequency.

Sessions have habits ("summarize" then "translate" the summary) and fashions that change
over a day, so both the transition counts and the overall frequencies decay
geometrically: old behaviour fades instead of out-voting the present. Pure Python; the
:mod:`preload` module turns predictions into cache warm-ups.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field


@dataclass
class NextCategoryPredictor:
    """``P(next) = w * P_markov(next | last) + (1 - w) * P_freq(next)``.

    ``decay`` multiplies all earlier counts on each observation; ``markov_weight`` is the
    share given to the transition from the current category once it has been seen.
    """

    decay: float = 0.97
    markov_weight: float = 0.8
    transitions: dict[str, dict[str, float]] = field(
        default_factory=lambda: defaultdict(lambda: defaultdict(float))
    )
    frequency: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    last: str | None = None
    observations: int = 0

    def __post_init__(self) -> None:
        if not 0.0 < self.decay <= 1.0 or not 0.0 <= self.markov_weight <= 1.0:
            raise ValueError("need 0 < decay <= 1 and 0 <= markov_weight <= 1")

    def observe(self, category: str, *, session_start: bool = False) -> None:
        """Record a request; ``session_start`` breaks the chain (no transition learned)."""
        for key in self.frequency:
            self.frequency[key] *= self.decay
        self.frequency[category] += 1.0
        if self.last is not None and not session_start:
            row = self.transitions[self.last]
            for key in row:
                row[key] *= self.decay
            row[category] += 1.0
        self.last = category
        self.observations += 1

    def distribution(self, current: str | None = None) -> dict[str, float]:
        """Probability of each known category being asked next after ``current``."""
        current = self.last if current is None else current
        total = sum(self.frequency.values())
        if total <= 0:
            return {}
        freq = {k: v / total for k, v in self.frequency.items()}
        row = self.transitions.get(current) if current is not None else None
        row_total = sum(row.values()) if row else 0.0
        if not row or row_total <= 0:
            return freq
        w = self.markov_weight
        return {k: w * row.get(k, 0.0) / row_total + (1 - w) * p for k, p in freq.items()}

    def predict(self, current: str | None = None, k: int = 1) -> list[tuple[str, float]]:
        """The ``k`` likeliest next categories, best first (ties broken by name)."""
        ranked = sorted(self.distribution(current).items(), key=lambda kv: (-kv[1], kv[0]))
        return ranked[:k]
