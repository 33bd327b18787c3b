"""Telling when a hop has slowed down mid-session, so the client can move off it. Pure.

Route choice weighs servers before a session starts; a server that turns slow later (its
owner started other work, another client's long prompt, thermal throttling) would keep
every later token of the session waiting. Each hop's decode steps, as the client times
them, are compared with that same hop's own first steps in this session: the server's
speed is judged against itself on this chain, so no card or estimate has to be right.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True)
class SlowdownPolicy:
    """A hop is slow once each of its last ``window`` decode steps took at least ``factor``
    times the mean of its first ``baseline_steps`` and ``min_extra_s`` more: sustained, so
    one hiccup (a pause, a busy moment) never triggers a move, which costs a replay, and
    jitter on millisecond steps is below the margin."""

    factor: float = 3.0
    min_extra_s: float = 0.02
    baseline_steps: int = 4
    window: int = 4

    def __post_init__(self) -> None:
        if self.factor <= 1.0 or self.min_extra_s < 0.0:
            raise ValueError(f"slowdown factor {self.factor} must exceed 1, extra >= 0")
        if self.baseline_steps < 1 or self.window < 1:
            raise ValueError("slowdown baseline and window need at least one step each")


class StepWindow:
    """One hop's decode-step times in a session: its baseline and its recent steps."""

    def __init__(self, policy: SlowdownPolicy) -> None:
        self.policy = policy
        self._baseline_sum = 0.0
        self._baseline_n = 0
        self._recent: deque[float] = deque(maxlen=policy.window)

    def add(self, seconds: float) -> None:
        if seconds < 0.0:
            raise ValueError(f"negative step time {seconds}")
        if self._baseline_n < self.policy.baseline_steps:
            self._baseline_sum += seconds
            self._baseline_n += 1
        else:
            self._recent.append(seconds)

    @property
    def baseline_s(self) -> float | None:
        if self._baseline_n < self.policy.baseline_steps:
            return None
        return self._baseline_sum / self._baseline_n

    @property
    def recent_s(self) -> float | None:
        if len(self._recent) < self.policy.window:
            return None
        return sum(self._recent) / len(self._recent)

    def __str__(self) -> str:
        base, recent = self.baseline_s, self.recent_s
        if base is None or recent is None:
            return "not measured yet"
        return f"decode steps {1e3 * base:.1f} ms at first, {1e3 * recent:.1f} ms lately"

    def slowed(self) -> bool:
        """True once every recent step is slower than the baseline by the policy's margins."""
        base = self.baseline_s
        if base is None or len(self._recent) < self.policy.window:
            return False
        fastest = min(self._recent)
        return fastest >= self.policy.factor * base and fastest - base >= self.policy.min_extra_s
