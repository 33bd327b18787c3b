"""Replayable request logs from a seeded generator of realistic sessions.

A session is one user doing one job: summarise a mail then translate the summary,
debug code for several turns, a few sums in a row. The ground truth is a Markov chain
over categories with sticky self-transitions and typical hand-offs, and think times
between requests; texts are drawn from the shipped labelled set. Same seed, same trace,
so pre-load on/off comparisons replay the very same requests.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from p2pedge.orchestrator.classifier import load_labelled

CATEGORIES = ("chat", "summarize", "translate", "explain-code", "math")

# Row: current category -> probabilities of the next one, in CATEGORIES order.
TRANSITIONS: dict[str, tuple[float, ...]] = {
    "chat": (0.55, 0.10, 0.15, 0.05, 0.15),
    "summarize": (0.05, 0.25, 0.60, 0.05, 0.05),
    "translate": (0.15, 0.15, 0.60, 0.05, 0.05),
    "explain-code": (0.05, 0.05, 0.00, 0.80, 0.10),
    "math": (0.10, 0.00, 0.05, 0.10, 0.75),
}
START = (0.35, 0.20, 0.10, 0.20, 0.15)


@dataclass(frozen=True)
class TraceEvent:
    """One request: when (seconds from the trace start), who, what."""

    t: float
    session: int
    turn: int
    category: str
    text: str


def generate_trace(
    *,
    seed: int = 0,
    sessions: int = 20,
    mean_turns: float = 5.0,
    think_s: tuple[float, float] = (0.5, 2.0),
    gap_s: float = 3.0,
) -> list[TraceEvent]:
    """Sessions one after another; think times uniform in ``think_s``."""
    rng = np.random.default_rng(seed)
    texts: dict[str, list[str]] = {c: [] for c in CATEGORIES}
    for text, category in load_labelled():
        texts.setdefault(category, []).append(text)
    events: list[TraceEvent] = []
    t = 0.0
    for session in range(sessions):
        turns = 1 + int(rng.poisson(mean_turns - 1))
        category = CATEGORIES[int(rng.choice(len(CATEGORIES), p=START))]
        for turn in range(turns):
            pool = texts[category]
            events.append(
                TraceEvent(t, session, turn, category, pool[int(rng.integers(len(pool)))])
            )
            t += float(rng.uniform(*think_s))
            row = TRANSITIONS[category]
            category = CATEGORIES[int(rng.choice(len(CATEGORIES), p=row))]
        t += float(rng.exponential(gap_s))
    return events


def save_trace(events: Iterable[TraceEvent], path: Path) -> None:
    """JSON lines, one event a line."""
    with Path(path).open("w", encoding="utf-8") as fh:
        for event in events:
            fh.write(json.dumps(asdict(event), ensure_ascii=False) + "\n")


def load_trace(path: Path) -> list[TraceEvent]:
    out = []
    for line in Path(path).read_text("utf-8").splitlines():
        if line.strip():
            raw = json.loads(line)
            out.append(
                TraceEvent(
                    float(raw["t"]),
                    int(raw["session"]),
                    int(raw["turn"]),
                    str(raw["category"]),
                    str(raw["text"]),
                )
            )
    return out


def percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=float), q)) if values else float("nan")
