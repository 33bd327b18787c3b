"""Replayable request logs from a seeded generator of assistant sessions.

A session is one user doing one job, and a job is a *workflow*: a small Markov chain over
categories with an end state. Some workflows chain specialists (paste a document,
summarise it, translate the summary, ask about it; explain code, chat about it, explain
the next piece), others stay on one (a long conversation, a batch of translations). The
session's workflow is drawn from :data:`WORKFLOWS` by its share; the predictor never sees
which workflow is running, only the categories. Between two requests of a session the
user reads the answer and types: a log-normal think time (:data:`THINK_MEDIAN_S`,
:data:`THINK_SIGMA`, at least :data:`THINK_MIN_S`); between sessions the user is away
(exponential, :data:`GAP_MEAN_S`). Texts come from the shipped labelled set. Same seed,
same trace, so pre-load on/off comparisons replay the very same requests.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from p2pedge.orchestrator.classifier import load_labelled

CATEGORIES = ("chat", "summarize", "translate", "explain-code", "math")
END = "end"
THINK_MEDIAN_S = 8.0
THINK_SIGMA = 0.7
THINK_MIN_S = 1.0
GAP_MEAN_S = 90.0
MAX_TURNS = 12


@dataclass(frozen=True)
class Workflow:
    """A kind of session: its share of sessions, first category and hand-offs."""

    name: str
    share: float
    start: Mapping[str, float]
    steps: Mapping[str, Mapping[str, float]]


WORKFLOWS: tuple[Workflow, ...] = (
    # A pasted document: summary (sometimes refined), translation, questions about it.
    Workflow(
        "document",
        0.30,
        {"summarize": 1.0},
        {
            "summarize": {"summarize": 0.15, "translate": 0.55, "chat": 0.20, END: 0.10},
            "translate": {"translate": 0.15, "chat": 0.45, "summarize": 0.10, END: 0.30},
            "chat": {"chat": 0.35, "translate": 0.15, "summarize": 0.10, END: 0.40},
        },
    ),
    # A developer: explain code, discuss it, explain the next piece, now and then a sum.
    Workflow(
        "developer",
        0.25,
        {"explain-code": 1.0},
        {
            "explain-code": {"chat": 0.50, "explain-code": 0.25, "math": 0.05, END: 0.20},
            "chat": {"explain-code": 0.55, "chat": 0.20, END: 0.25},
            "math": {"explain-code": 0.60, "chat": 0.20, END: 0.20},
        },
    ),
    # Homework: a problem, a question about the method, the next problem.
    Workflow(
        "study",
        0.15,
        {"math": 0.7, "chat": 0.3},
        {
            "math": {"math": 0.35, "chat": 0.40, "explain-code": 0.05, END: 0.20},
            "chat": {"math": 0.50, "chat": 0.20, END: 0.30},
            "explain-code": {"math": 0.50, "chat": 0.20, END: 0.30},
        },
    ),
    # Plain conversation, which stays on one specialist.
    Workflow(
        "conversation",
        0.20,
        {"chat": 1.0},
        {
            "chat": {"chat": 0.70, "translate": 0.08, "summarize": 0.04, END: 0.18},
            "translate": {"chat": 0.60, "translate": 0.20, END: 0.20},
            "summarize": {"chat": 0.60, "translate": 0.10, END: 0.30},
        },
    ),
    # A batch of phrases to translate.
    Workflow(
        "translation",
        0.10,
        {"translate": 1.0},
        {
            "translate": {"translate": 0.65, "chat": 0.10, END: 0.25},
            "chat": {"translate": 0.50, "chat": 0.20, END: 0.30},
        },
    ),
)


@dataclass(frozen=True)
class TraceEvent:
    """One request. ``t`` is the nominal arrival (seconds from the trace start) when
    every answer were instant; ``think_s`` is the user's pause after the previous answer
    (the session gap for a first turn), which a closed-loop replay honours."""

    t: float
    session: int
    turn: int
    category: str
    text: str
    think_s: float = 0.0
    workflow: str = ""


def _draw(rng: np.random.Generator, probs: Mapping[str, float]) -> str:
    keys = list(probs)
    p = np.asarray([probs[k] for k in keys], dtype=float)
    return keys[int(rng.choice(len(keys), p=p / p.sum()))]


def think_time(rng: np.random.Generator) -> float:
    """Reading the answer and typing the next request: log-normal, floored."""
    return max(THINK_MIN_S, float(rng.lognormal(np.log(THINK_MEDIAN_S), THINK_SIGMA)))


def generate_trace(
    *, seed: int = 0, sessions: int = 20, workflows: Sequence[Workflow] = WORKFLOWS
) -> list[TraceEvent]:
    """``sessions`` sessions of one user, one after another."""
    rng = np.random.default_rng(seed)
    texts: dict[str, list[str]] = {c: [] for c in CATEGORIES}
    for text, category in load_labelled():
        texts.setdefault(category, []).append(text)
    shares = {w.name: w.share for w in workflows}
    by_name = {w.name: w for w in workflows}
    events: list[TraceEvent] = []
    t = 0.0
    for session in range(sessions):
        flow = by_name[_draw(rng, shares)]
        pause = float(rng.exponential(GAP_MEAN_S)) if session else 0.0
        category = _draw(rng, flow.start)
        for turn in range(MAX_TURNS):
            t += pause
            pool = texts[category]
            text = pool[int(rng.integers(len(pool)))]
            events.append(TraceEvent(t, session, turn, category, text, pause, flow.name))
            category = _draw(rng, flow.steps[category])
            if category == END:
                break
            pause = think_time(rng)
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
                    float(raw.get("think_s", 0.0)),
                    str(raw.get("workflow", "")),
                )
            )
    return out


def percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=float), q)) if values else float("nan")
