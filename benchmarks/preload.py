"""Predictive pre-load on a replayed session trace: hit rate and TTFT, pre-load on vs off.

Five real tiny Llama models of different depths (so loads are real and cost different
times) back the five specialists, one model each, as a deployment of distinct specialist
models would; the cache holds 2 models in both modes. The same seeded trace
(``p2pedge.orchestrator.trace``: workflow sessions with log-normal think times) is
replayed through ``Orchestrator.ask`` once per mode, closed-loop: the next request of
a session goes out the user's think time after the previous answer came back. With
pre-load, the predictor and the background warm-ups get exactly that think time; without,
the cache's own eviction policy decides and a miss waits for a cold load.

The default is 40 sessions (134 requests on seed 0); it was 22 (62 requests), too few for
a stable median: the p50 of either mode sits near the hit/miss boundary. Each of
``--rounds`` rounds replays its own trace (seed, seed + 1, ...) in both modes, taking
turns to go first; a speed-up is the median of the per-round ratios, with its min-max.

Think times are replayed at ``--time-scale`` (default 1/20) and any single wait is cut to
``--max-wait-s``; loads are not scaled. A hit is a request whose model was warm when it
was routed; TTFT counts from the call to the model, load included.

    .venv/bin/python benchmarks/preload.py [--sessions 40] [--rounds 3] [--seed 0] [--no-doc]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._report import (
    RATIO_DEFINITION,
    headline,
    machine,
    paired_ratio,
    ratio_cell,
    ratio_fields,
    table,
    turns,
    write_section,
)
from p2pedge.errors import ModelNotCached
from p2pedge.ids import ModelId
from p2pedge.node.inference import LocalInference
from p2pedge.orchestrator.catalog import Catalog, Specialist
from p2pedge.orchestrator.orchestrator import Orchestrator
from p2pedge.orchestrator.predictor import NextCategoryPredictor
from p2pedge.orchestrator.trace import (
    END,
    THINK_MEDIAN_S,
    THINK_SIGMA,
    WORKFLOWS,
    TraceEvent,
    generate_trace,
    percentile,
    save_trace,
)
from p2pedge.runtime.config import RuntimeConfig
from p2pedge.runtime.policy import DEFAULT_HALF_LIFE_S as HALF_LIFE_S
from p2pedge.testing import build_tiny_model

ROOT = Path(__file__).resolve().parent.parent
# One model per specialist, of different depths: different sizes, different load times.
BACKING = {
    "chat": ("chat-l8", 8),
    "summarize": ("summarize-l32", 32),
    "translate": ("translate-l24", 24),
    "explain-code": ("code-l48", 48),
    "math": ("math-l16", 16),
}
MAX_MODELS = 2


@dataclass
class Result:
    ttft: list[float] = field(default_factory=list)
    hit: list[bool] = field(default_factory=list)
    loads: int = 0
    warmed: int = 0
    used: int = 0
    wasted: int = 0
    made_room: int = 0
    overlapped: int = 0
    skipped: int = 0

    @property
    def hit_rate(self) -> float:
        return sum(self.hit) / len(self.hit)

    def __iadd__(self, other: Result) -> Result:
        """Pool another round's requests and counts into this one."""
        self.ttft += other.ttft
        self.hit += other.hit
        for name in ("loads", "warmed", "used", "wasted", "made_room", "overlapped", "skipped"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        return self


def catalog() -> Catalog:
    cat = Catalog()
    for category, (model, _) in BACKING.items():
        cat.add(Specialist(category, category, model, max_tokens=4, temperature=0.0))
    return cat


async def replay(
    dirs: dict[str, Path],
    events: list[TraceEvent],
    *,
    preload: bool,
    scale: float,
    max_wait_s: float,
) -> Result:
    def resolve(mid: ModelId) -> Path:
        if mid.name not in dirs:
            raise ModelNotCached(str(mid))
        return dirs[mid.name]

    # The replay compresses the user's pauses by `scale`; the cache's sense of idle time
    # is compressed alike, or every model would look recently used to it.
    config = RuntimeConfig(
        max_models=MAX_MODELS, intra_op_threads=1, cache_half_life_s=HALF_LIFE_S * scale
    )
    local = LocalInference(resolve, config)
    res = Result()
    try:
        async with trio.open_nursery() as nursery:
            orch = Orchestrator(
                local, None, catalog=catalog(), predictor=NextCategoryPredictor(),
                nursery=nursery, preload=preload, max_models=MAX_MODELS,
            )  # fmt: skip
            for event in events:
                await trio.sleep(min(event.think_s * scale, max_wait_s))
                answer = await orch.ask(event.text)
                res.ttft.append(answer.ttft_s)
                res.hit.append(answer.was_warm)
            if orch.preloader is not None:
                await orch.preloader.idle.wait()
                orch.preloader.settle()
                stats = orch.preloader.stats
                res.warmed, res.used = len(stats.warmed), len(stats.used)
                res.wasted, res.made_room = len(stats.wasted), len(stats.made_room)
                res.overlapped, res.skipped = stats.overlapped, stats.skipped
        res.loads = local.cache.loads
    finally:
        local.close()
    return res


def by_workflow(events: list[TraceEvent], res: Result) -> dict[str, float]:
    hits: Counter[str] = Counter()
    for event, hit in zip(events, res.hit, strict=True):
        hits[event.workflow] += hit
    counts = Counter(e.workflow for e in events)
    return {name: hits[name] / counts[name] for name in counts}


def workflow_oracle(event: TraceEvent) -> dict[str, float]:
    """The true next-category distribution after ``event``, knowing its session's hidden
    workflow: its row of that workflow, the end share spread over session starts."""
    row = next(w for w in WORKFLOWS if w.name == event.workflow).steps[event.category]
    out = {c: p for c, p in row.items() if c != END}
    for flow in WORKFLOWS:
        for category, p in flow.start.items():
            out[category] = out.get(category, 0.0) + row.get(END, 0.0) * flow.share * p
    return out


def offline_reference(events: list[TraceEvent]) -> tuple[float, float, float]:
    """Hit rates with no load times at all, on the true categories, for a cache of 2: plain
    LRU; keeping the predictor's top 2 warm (what instant pre-loads would give); keeping
    the top 2 of the true workflow's distribution (a bound for any predictor that sees
    only categories: it knows the hidden workflow and its probabilities)."""
    lru: list[str] = []
    predictor = NextCategoryPredictor()
    lru_hits = top2_hits = oracle_hits = 0
    previous: TraceEvent | None = None
    for event in events:
        lru_hits += event.category in lru
        top2_hits += event.category in [c for c, _ in predictor.predict(k=2)]
        if previous is not None:
            truth = workflow_oracle(previous)
            oracle_hits += event.category in sorted(truth, key=lambda c: -truth[c])[:MAX_MODELS]
        lru = [event.category, *(c for c in lru if c != event.category)][:MAX_MODELS]
        predictor.observe(event.category)
        previous = event
    n = len(events)
    return lru_hits / n, top2_hits / n, oracle_hits / n


def plot(events: list[TraceEvent], off: Result, on: Result, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 3.8))
    for res, label in ((off, "pre-load off"), (on, "pre-load on")):
        xs = sorted(t * 1000 for t in res.ttft)
        ax.step(xs, [(i + 1) / len(xs) for i in range(len(xs))], where="post", label=label)
    ax.set_xscale("log")
    ax.set_xlabel("time to first token (ms, log)")
    ax.set_ylabel("fraction of requests")
    ax.set_title(f"TTFT, cache of {MAX_MODELS} models")
    ax.legend()
    flows = [w.name for w in WORKFLOWS if any(e.workflow == w.name for e in events)]
    off_w, on_w = by_workflow(events, off), by_workflow(events, on)
    x = np.arange(len(flows))
    bx.bar(x - 0.2, [off_w[f] for f in flows], 0.4, label="pre-load off")
    bx.bar(x + 0.2, [on_w[f] for f in flows], 0.4, label="pre-load on")
    bx.set_xticks(x, flows, rotation=20, fontsize=8)
    bx.set_ylabel("hit rate")
    bx.set_ylim(0, 1)
    bx.set_title("Hit rate by workflow")
    bx.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--sessions", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0, help="round r replays seed + r")
    parser.add_argument("--rounds", type=int, default=3, help="paired off/on rounds")
    parser.add_argument("--time-scale", type=float, default=0.05)
    parser.add_argument("--max-wait-s", type=float, default=1.0)
    parser.add_argument("--save-trace", type=Path, default=None)
    parser.add_argument("--no-doc", action="store_true")
    args = parser.parse_args()
    print(f"load average {os.getloadavg()[0]:.1f} at the start")
    traces = [
        generate_trace(seed=args.seed + r, sessions=args.sessions) for r in range(args.rounds)
    ]
    if args.save_trace is not None:
        save_trace(traces[0], args.save_trace)
    events = [event for trace in traces for event in trace]  # all rounds, in order
    with tempfile.TemporaryDirectory() as tmp:
        dirs = {
            model: build_tiny_model(Path(tmp) / model, seed=i, n_layers=layers)
            for i, (model, layers) in enumerate(BACKING.values())
        }
        kw = {"scale": args.time_scale, "max_wait_s": args.max_wait_s}
        # Read every model once so neither mode pays first-read (page cache) costs.
        warmup = [TraceEvent(0.0, 0, i, c, c) for i, c in enumerate(BACKING)]
        trio.run(lambda: replay(dirs, warmup, preload=False, **kw))
        rounds: dict[str, list[Result]] = {"off": [], "on": []}
        for r, trace in enumerate(traces):
            for mode in turns(("off", "on"), r):
                rounds[mode].append(
                    trio.run(partial(replay, dirs, trace, preload=mode == "on", **kw))
                )
    off, on = Result(), Result()
    for off_round, on_round in zip(rounds["off"], rounds["on"], strict=True):
        off += off_round
        on += on_round

    def per_round(mode: str, q: float) -> list[float]:
        return [percentile(res.ttft, q) for res in rounds[mode]]

    speedup = paired_ratio(per_round("off", 50), per_round("on", 50))
    speedup95 = paired_ratio(per_round("off", 95), per_round("on", 95))
    headers = ["pre-load", "requests", "hit rate", "TTFT p50 ms", "TTFT p95 ms"]
    headers += ["model loads", "pre-loads", "used", "wasted", "skipped", "room on miss"]
    headers += ["waited on a pre-load", "TTFT p50 speed-up (min-max)"]
    rows = []
    for name, res in (("off", off), ("on", on)):
        extra = [res.warmed, res.used, res.wasted, res.skipped, res.made_room, res.overlapped]
        rows.append(
            [
                f"{name} (tiny models, think times x{args.time_scale:g})", len(res.ttft),
                f"{res.hit_rate:.1%}",
                f"{percentile(res.ttft, 50) * 1000:.1f}", f"{percentile(res.ttft, 95) * 1000:.1f}",
                res.loads, *(extra if name == "on" else ["-"] * len(extra)),
                ratio_cell(speedup) if name == "on" else "baseline",
            ]
        )  # fmt: skip
    off_w, on_w = by_workflow(events, off), by_workflow(events, on)
    counts = Counter(e.workflow for e in events)
    flow_rows = [
        [w.name, f"{w.share:.2f}", counts[w.name], f"{off_w[w.name]:.1%}", f"{on_w[w.name]:.1%}"]
        for w in WORKFLOWS
        if w.name in counts
    ]

    main_table = table(headers, rows)
    flow_table = table(["workflow", "share", "requests", "hit off", "hit on"], flow_rows)
    print(main_table)
    print(flow_table)
    refs = [(len(trace), offline_reference(trace)) for trace in traces]
    lru2, top2, oracle = (sum(n * ref[k] for n, ref in refs) / len(events) for k in range(3))
    reference = (
        f"Offline reference on the same traces (true categories, loads instant): a plain "
        f"LRU cache of 2 hits {lru2:.1%}; keeping the predictor's top 2 warm hits {top2:.1%}; "
        f"keeping the top 2 of the true workflow's distribution (knows the hidden workflow) "
        f"hits {oracle:.1%}."
    )
    print(f"p50 speed-up {ratio_cell(speedup)}, p95 speed-up {ratio_cell(speedup95)}")
    print(reference)
    if not args.no_doc:
        plot(events, off, on, ROOT / "docs" / "preload.png")
        models = ", ".join(f"{c} -> {m} ({n} layers)" for c, (m, n) in BACKING.items())
        body = (
            "## Predictive pre-load (`benchmarks/preload.py`)\n\n"
            f"{machine()}. {args.rounds} rounds, each a seeded trace (seeds {args.seed}-"
            f"{args.seed + args.rounds - 1}) of {args.sessions} workflow "
            f"sessions, {len(events)} requests in all (`p2pedge.orchestrator.trace`, think time "
            f"log-normal, median {THINK_MEDIAN_S:.0f} s, sigma {THINK_SIGMA}), replayed "
            f"closed-loop at time scale {args.time_scale:g} (waits cut to "
            f"{args.max_wait_s:g} s; loads not scaled), through classifier routing. "
            f"One real tiny model per specialist: {models}; cache of {MAX_MODELS} models "
            "in both modes, same rounds (off and on taking turns to go first); the tables "
            "pool every round's requests. 4 tokens per answer; TTFT from the call to the "
            "model, load included. *Wasted*: pre-loaded, then evicted before any request "
            "used it. *Skipped*: passes that left a wanted model cold because its load "
            "would likely still run when the next request comes (from the user's recent "
            "think times). *Room on miss*: models unloaded on a miss because they were the "
            "least likely next (instead of the cache's cost-aware choice). *Waited on a "
            "pre-load*: requests that arrived while a warm-up was loading (a load holds the "
            "GIL, so they wait for it).\n\n"
            f"{main_table}\n\n{flow_table}\n\n"
            f"TTFT p50 speed-up {ratio_cell(speedup)}, p95 {ratio_cell(speedup95)} (per "
            f"round: p50 off / p50 on of that round's trace). {RATIO_DEFINITION} "
            f"{reference}\n\n"
            "![preload](preload.png)"
        )
        write_section("preload", body)
    fields = ratio_fields("ttft_p50_speedup", speedup)
    fields |= ratio_fields("ttft_p95_speedup", speedup95)
    print(headline(fields | {"hit_rate": f"{on.hit_rate:.3f}"}))


if __name__ == "__main__":
    main()
