"""Which specialist comes next: a decayed Markov chain over categories, plus recency and
frequency.

Sessions have habits ("summarize" then "translate" the summary) and fashions that change
over a day, so both the transition counts and the overall frequencies decay
geometrically: old behaviour fades instead of out-voting the present. A first-order
chain cannot tell which job a shared category such as "chat" belongs to (chat after code
leads back to code, chat after a summary to a translation), so its row after "chat" is
a blur. The recency term puts weight on the last two distinct categories, which is what
an LRU cache keeps: where the chain is unsure the blend falls back towards recency, and
where it is sure it overrules it. Pure Python; :mod:`preload` turns predictions into
cache warm-ups.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

RECENT_SHARES = (0.6, 0.4)  # last category, the distinct one before it


@dataclass
class NextCategoryPredictor:
    """``P(next) = wm P_markov(next | last) + wr P_recent(next) + (1 - wm - wr) P_freq(next)``.

    ``decay`` multiplies all earlier counts on each observation; ``markov_weight`` is the
    share given to the transition row of the current category once it has been seen
    (before that, frequency takes its share); ``recency_weight`` the share spread over
    the last two distinct categories (:data:`RECENT_SHARES`).
    """

    decay: float = 0.97
    markov_weight: float = 0.6
    recency_weight: float = 0.3
    transitions: dict[str, dict[str, float]] = field(
        default_factory=lambda: defaultdict(lambda: defaultdict(float))
    )
    frequency: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    recent: list[str] = field(default_factory=list)
    last: str | None = None
    observations: int = 0

    def __post_init__(self) -> None:
        wm, wr = self.markov_weight, self.recency_weight
        if not 0.0 < self.decay <= 1.0 or wm < 0.0 or wr < 0.0 or wm + wr > 1.0:
            raise ValueError("need 0 < decay <= 1, weights >= 0 and markov + recency <= 1")

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
        self.recent = [category, *(c for c in self.recent if c != category)][: len(RECENT_SHARES)]
        self.last = category
        self.observations += 1

    def distribution(self, current: str | None = None) -> dict[str, float]:
        """Probability of each known category being asked next after ``current``.

        ``current`` defaults to the last category observed; another one is treated as the
        request being served now (its row of the chain, and the latest for recency), which
        is what a cache miss needs to choose a victim before the answer is learned.
        """
        current = self.last if current is None else current
        total = sum(self.frequency.values())
        if total <= 0:
            return {}
        freq = {k: v / total for k, v in self.frequency.items()}
        row = self.transitions.get(current) if current is not None else None
        row_total = sum(row.values()) if row else 0.0
        markov = {k: row.get(k, 0.0) / row_total for k in freq} if row and row_total > 0 else freq
        latest = self.recent
        if current is not None and current != self.last:
            latest = [current, *(c for c in self.recent if c != current)][: len(RECENT_SHARES)]
        shares = RECENT_SHARES[: len(latest)]
        recent = {c: s / sum(shares) for c, s in zip(latest, shares, strict=False)}
        wm, wr = self.markov_weight, self.recency_weight
        return {
            k: wm * markov[k] + wr * recent.get(k, 0.0) + (1 - wm - wr) * p for k, p in freq.items()
        }

    def predict(self, current: str | None = None, k: int = 1) -> list[tuple[str, float]]:
        """The ``k`` likeliest next categories, best first (ties broken by name)."""
        ranked = sorted(self.distribution(current).items(), key=lambda kv: (-kv[1], kv[0]))
        return ranked[:k]
