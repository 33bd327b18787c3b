"""Which warm models to evict: a pure function of their measured statistics.

Score (the value of keeping a model warm; the lowest is evicted first)::

    keep = (load_s + 0.01) * (1 + log2(1 + uses)) * 2 ** (-idle_s / half_life_s)

* ``load_s`` — the measured reload cost: a model that took 3 s to load is worth
  keeping over one that reloads in 50 ms;
* ``1 + log2(1 + uses)`` — frequency, damped so that a burst of use long ago does not
  pin a model forever;
* ``2 ** (-idle_s / half_life_s)`` — recency: the value halves every ``half_life_s``
  (default 60 s, about seven of a user's pauses between requests) of idleness.

Why 60 s: on the seeded session traces (`p2pedge.orchestrator.trace`, 10 seeds of 40
sessions, cache of 2, reload costs 20-120 ms) a half-life of 60 s spent slightly less time
reloading than plain LRU (3.00 s against 3.03 s per trace) at 65.8% hits against LRU's
69.3%; the former 5 minutes let old, expensive models squat (58.7% hits, 3.38 s).

Pinned models and models in use are never candidates. Victims are taken in ascending
score (ties: least recently used first) until both the count and the byte budget hold;
if evicting every candidate is not enough the answer is None and nothing is evicted.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping
from dataclasses import dataclass
from typing import TypeVar

DEFAULT_HALF_LIFE_S = 60.0
K = TypeVar("K", bound=Hashable)


@dataclass(frozen=True)
class EntryStats:
    size_bytes: int
    load_s: float
    uses: int
    last_used: float
    pinned: bool = False
    in_use: bool = False

    @property
    def evictable(self) -> bool:
        return not (self.pinned or self.in_use)


def keep_score(e: EntryStats, now: float, half_life_s: float = DEFAULT_HALF_LIFE_S) -> float:
    """Value of keeping ``e`` warm at time ``now`` (see the module docstring)."""
    idle = max(0.0, now - e.last_used)
    recency: float = 2.0 ** (-idle / half_life_s)
    frequency = 1.0 + math.log2(1 + max(0, e.uses))
    return (max(0.0, e.load_s) + 0.01) * frequency * recency


def choose_victims(
    entries: Mapping[K, EntryStats],
    *,
    max_models: int,
    budget_bytes: int,
    now: float,
    extra_count: int = 0,
    extra_bytes: int = 0,
    half_life_s: float = DEFAULT_HALF_LIFE_S,
) -> list[K] | None:
    """Keys to evict so that ``entries`` plus the extra model(s) fit both limits.

    Returns ``[]`` when everything already fits and ``None`` when no choice of
    evictable entries would make it fit.
    """
    count = len(entries) + extra_count
    used = sum(e.size_bytes for e in entries.values()) + extra_bytes
    candidates = sorted(
        (k for k, e in entries.items() if e.evictable),
        key=lambda k: (keep_score(entries[k], now, half_life_s), entries[k].last_used),
    )
    victims: list[K] = []
    for key in candidates:
        if count <= max_models and used <= budget_bytes:
            break
        victims.append(key)
        count -= 1
        used -= entries[key].size_bytes
    if count <= max_models and used <= budget_bytes:
        return victims
    return None
