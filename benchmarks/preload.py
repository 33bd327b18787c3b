"""Predictive pre-load on a replayed session trace: hit rate and TTFT, pre-load on vs off.

Four real tiny Llama models of different depths (so loads are real and cost different
times) back the five categories; the cache holds 2 models in both modes. The same seeded
trace (``p2pedge.orchestrator.trace``) is replayed through ``Orchestrator.ask`` twice in
this run, with think times between requests as real pauses: once with the predictor and
background pre-load, once without (the cache's own eviction policy only). A hit is a
request whose model was already warm when it arrived; TTFT counts from the call, load
included.

    .venv/bin/python benchmarks/preload.py [--sessions 12] [--seed 0] [--no-doc]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import tempfile
from dataclasses import dataclass
from pathlib import Path

import trio

from p2pedge.errors import ModelNotCached
from p2pedge.ids import ModelId
from p2pedge.node.inference import LocalInference
from p2pedge.orchestrator.catalog import Catalog, Specialist
from p2pedge.orchestrator.orchestrator import Orchestrator
from p2pedge.orchestrator.predictor import NextCategoryPredictor
from p2pedge.orchestrator.trace import TraceEvent, generate_trace, percentile
from p2pedge.runtime.config import RuntimeConfig
from p2pedge.testing import build_tiny_model

ROOT = Path(__file__).resolve().parent.parent
MODELS = {"tiny-l4": 4, "tiny-l8": 8, "tiny-l16": 16, "tiny-l24": 24}
BACKING = {
    "chat": "tiny-l4",
    "summarize": "tiny-l8",
    "translate": "tiny-l16",
    "explain-code": "tiny-l24",
    "math": "tiny-l24",
}
MAX_MODELS = 2


@dataclass
class Result:
    ttft: list[float]
    hits: int
    total: int
    warmed: int


def catalog() -> Catalog:
    cat = Catalog()
    for category, model in BACKING.items():
        cat.add(Specialist(category, category, model, max_tokens=4, temperature=0.0))
    return cat


async def replay(dirs: dict[str, Path], events: list[TraceEvent], preload: bool) -> Result:
    def resolve(mid: ModelId) -> Path:
        if mid.name not in dirs:
            raise ModelNotCached(str(mid))
        return dirs[mid.name]

    local = LocalInference(resolve, RuntimeConfig(max_models=MAX_MODELS, intra_op_threads=1))
    ttft: list[float] = []
    hits = 0
    try:
        async with trio.open_nursery() as nursery:
            orch = Orchestrator(
                local, None, catalog=catalog(), predictor=NextCategoryPredictor(),
                nursery=nursery, preload=preload, max_models=MAX_MODELS,
            )  # fmt: skip
            clock = trio.current_time()
            for event in events:
                await trio.sleep_until(clock + event.t)
                answer = await orch.ask(event.text)
                ttft.append(answer.ttft_s)
                hits += answer.was_warm
            warmed = len(orch.preloader.stats.warmed) if orch.preloader else 0
    finally:
        local.close()
    return Result(ttft, hits, len(events), warmed)


def plot(off: Result, on: Result, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    for res, label in ((off, "pre-load off"), (on, "pre-load on")):
        xs = sorted(t * 1000 for t in res.ttft)
        ax.step(xs, [(i + 1) / len(xs) for i in range(len(xs))], where="post", label=label)
    ax.set_xscale("log")
    ax.set_xlabel("time to first token (ms, log)")
    ax.set_ylabel("fraction of requests")
    ax.set_title("Replayed sessions, cache of 2 models")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_section(path: Path, name: str, body: str) -> None:
    begin, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    text = path.read_text("utf-8") if path.exists() else "# Benchmarks\n"
    block = f"{begin}\n{body}\n{end}"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(text, "utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-doc", action="store_true")
    args = parser.parse_args()
    events = generate_trace(seed=args.seed, sessions=args.sessions, think_s=(0.4, 0.9), gap_s=0.8)
    with tempfile.TemporaryDirectory() as tmp:
        dirs = {
            name: build_tiny_model(Path(tmp) / name, seed=i, n_layers=layers)
            for i, (name, layers) in enumerate(MODELS.items())
        }
        # Warm the OS page cache for every model so neither mode pays first-read costs.
        trio.run(replay, dirs, [TraceEvent(0.0, 0, i, c, c) for i, c in enumerate(BACKING)], False)
        off = trio.run(replay, dirs, events, False)
        on = trio.run(replay, dirs, events, True)
    rows = []
    for name, res in (("off", off), ("on", on)):
        rows.append(
            f"| {name} | {res.total} | {res.hits / res.total:.1%} | "
            f"{percentile(res.ttft, 50) * 1000:.1f} | {percentile(res.ttft, 95) * 1000:.1f} | "
            f"{res.warmed} |"
        )
    speedup = percentile(off.ttft, 50) / percentile(on.ttft, 50)
    speedup95 = percentile(off.ttft, 95) / percentile(on.ttft, 95)
    table = "\n".join(
        [
            "| pre-load | requests | hit rate | TTFT p50 ms | TTFT p95 ms | background loads |",
            "|---|---:|---:|---:|---:|---:|",
            *rows,
        ]
    )
    print(table)
    print(f"p50 speed-up {speedup:.2f}x, p95 speed-up {speedup95:.2f}x")
    if not args.no_doc:
        plot(off, on, ROOT / "docs" / "preload.png")
        body = (
            f"## Predictive pre-load (`benchmarks/preload.py`)\n\n"
            f"{datetime.date.today().isoformat()}, {platform.machine()} "
            f"{platform.processor() or ''}, {os.cpu_count()} cores. Seeded trace of "
            f"{args.sessions} sessions ({on.total} requests, seed {args.seed}), 4 real tiny "
            f"models of 4/8/16/24 layers, cache of {MAX_MODELS} models in both modes, "
            "classifier routing, 4 tokens per answer; TTFT from the call (load included).\n\n"
            f"{table}\n\nTTFT p50 speed-up {speedup:.2f}x, p95 {speedup95:.2f}x.\n\n"
            "![preload](preload.png)"
        )
        write_section(ROOT / "docs" / "benchmarks.md", "preload", body)
    print(f"ttft_p50_speedup={speedup:.2f} hit_rate={on.hits / on.total:.3f}")


if __name__ == "__main__":
    main()
