"""Federated map speed-up over N peers with modeled compute (``ModeledCompute``).

The scheduler is the real :func:`p2pedge.orchestrator.federated.federated_map`; only the
compute is modeled: a request costs ``tokens * gflop_per_token / capacity`` seconds of
the peer's card capacity (GFLOP/s times idle share) plus a network round trip. Runs under
``trio.testing.MockClock(autojump_threshold=0)``, so virtual seconds pass instantly and
the figures are deterministic for a seed (real time would measure this machine's 2
shared cores, not the scheduler). A second run per N kills one peer midway
(``PeerKiller``, a fault injector) and checks every result arrives exactly once.

    .venv/bin/python -m simnet.federated [--prompts 400] [--rounds 3] [--seed 0] [--no-doc]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import random
import statistics
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio
import trio.testing

from benchmarks._report import (
    RATIO_DEFINITION,
    headline,
    paired_ratio,
    ratio_cell,
    ratio_fields,
)
from p2pedge.errors import PeerUnavailable
from p2pedge.orchestrator.federated import MapStats, Worker, capacity, federated_map

ROOT = Path(__file__).resolve().parent.parent
NS = (1, 2, 5, 10, 20)
GFLOP_PER_TOKEN = 0.27  # ~2 x 135M parameters
RTT_S = 0.004


@dataclass(frozen=True)
class ModelCard:
    """The card fields the scheduler reads (same names as CapabilityCard)."""

    peer_id: str
    compute_gflops: float
    load: float


class ModeledCompute:
    """Sleeps ``work / capacity`` per request; one request at a time per peer."""

    def __init__(self, cards: list[ModelCard], tokens: int) -> None:
        self.speed = {c.peer_id: capacity(c) for c in cards}
        self.locks = {c.peer_id: trio.Lock() for c in cards}
        self.tokens = tokens
        self.runs: Counter[int] = Counter()

    async def __call__(self, peer: str, item: int) -> int:
        await trio.sleep(RTT_S / 2)
        async with self.locks[peer]:
            await trio.sleep(self.tokens * GFLOP_PER_TOKEN / self.speed[peer])
        await trio.sleep(RTT_S / 2)
        self.runs[item] += 1
        return item


class PeerKiller:
    """Fault injector: the victim fails every request ``after_s`` seconds from now on."""

    def __init__(self, inner: ModeledCompute, victim: str, after_s: float) -> None:
        self.inner, self.victim = inner, victim
        self.at_s = trio.current_time() + after_s

    async def __call__(self, peer: str, item: int) -> int:
        if peer == self.victim:
            with trio.move_on_at(self.at_s):
                return await self.inner(peer, item)
            raise PeerUnavailable(f"{peer} died")
        return await self.inner(peer, item)


def cards_for(n: int, seed: int, *, uniform: bool) -> list[ModelCard]:
    rng = random.Random(seed)
    if uniform:
        return [ModelCard(f"peer{i}", 20.0, 0.0) for i in range(n)]
    return [ModelCard(f"peer{i}", rng.uniform(10.0, 40.0), rng.uniform(0.0, 0.5)) for i in range(n)]


async def run_once(cards: list[ModelCard], prompts: int, kill_at: float | None) -> dict[str, float]:
    compute = ModeledCompute(cards, tokens=64)
    execute = compute if kill_at is None else PeerKiller(compute, cards[-1].peer_id, kill_at)
    stats = MapStats()
    start = trio.current_time()
    workers = [Worker(c.peer_id, capacity(c)) for c in cards]
    out = await federated_map(execute, range(prompts), workers, stats=stats)
    elapsed = trio.current_time() - start
    assert out == list(range(prompts)), "results out of order"
    assert sorted(compute.runs) == list(range(prompts)) and set(compute.runs.values()) == {1}
    bound = prompts * 64 * GFLOP_PER_TOKEN / sum(capacity(c) for c in cards)
    return {"time": elapsed, "bound": bound, "retries": stats.retries}


def simulate(prompts: int, seed: int, rounds: int) -> list[dict[str, Any]]:
    """Per N: the speed-up over 1 peer and the mixed cards' share of the capacity bound,
    each a median of per-round ratios (round r draws its mixed cards from ``seed + r``)."""
    keys = ("time", "base", "bound", "mixed", "killed_time", "killed_retries")
    per_n: dict[int, dict[str, list[float]]] = {n: {k: [] for k in keys} for n in NS}

    async def main() -> None:
        for r in range(rounds):
            base = None
            for n in NS:
                uniform = await run_once(cards_for(n, seed + r, uniform=True), prompts, None)
                base = base or uniform["time"]
                mixed = await run_once(cards_for(n, seed + r, uniform=False), prompts, None)
                kill_at = uniform["time"] / 2 if n > 1 else None
                killed = await run_once(cards_for(n, seed + r, uniform=True), prompts, kill_at)
                got = per_n[n]
                got["time"].append(uniform["time"])
                got["base"].append(base)
                got["bound"].append(mixed["bound"])
                got["mixed"].append(mixed["time"])
                got["killed_time"].append(killed["time"])
                got["killed_retries"].append(killed["retries"])

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    return [
        {
            "n": n,
            "time": statistics.median(got["time"]),
            "speedup": paired_ratio(got["base"], got["time"]),
            "mixed_eff": paired_ratio(got["bound"], got["mixed"]),
            "killed_time": statistics.median(got["killed_time"]),
            "killed_retries": statistics.median(got["killed_retries"]),
        }
        for n, got in per_n.items()
    ]


def table(rows: list[dict[str, Any]], prompts: int, rounds: int) -> str:
    lines = [
        f"{prompts} independent prompts x 64 tokens, modeled compute, MockClock (virtual "
        f"seconds), {rounds} rounds. {RATIO_DEFINITION} Harness shortcut: virtual time, so "
        "identical cards give the same figure every round (min = max); mixed cards are "
        "drawn anew per round.",
        "",
        "| peers (modeled compute, virtual time) | time s | speed-up (min-max) | ideal | "
        "efficiency | "
        "mixed cards: vs capacity bound (min-max) | 1 peer killed midway: time s (retries) |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        mixed = r["mixed_eff"]
        lines.append(
            f"| {r['n']:.0f} | {r['time']:.2f} | {ratio_cell(r['speedup'])} | {r['n']:.0f}x | "
            f"{r['speedup'].median / r['n']:.1%} | "
            f"{mixed.median:.1%} ({mixed.low:.1%}-{mixed.high:.1%}) | "
            f"{r['killed_time']:.2f} ({r['killed_retries']:.0f}) |"
        )
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = [r["n"] for r in rows]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(ns, ns, "--", color="grey", label="ideal (N x)")
    ax.plot(ns, [r["speedup"].median for r in rows], "o-", label="federated map")
    ax.set_xlabel("peers")
    ax.set_ylabel("speed-up vs 1 peer")
    ax.set_title("Federated map, modeled compute")
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
    parser.add_argument("--prompts", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0, help="round r draws seed + r")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-doc", action="store_true")
    args = parser.parse_args()
    rows = simulate(args.prompts, args.seed, args.rounds)
    text = table(rows, args.prompts, args.rounds)
    print(text)
    if not args.no_doc:
        png = ROOT / "docs" / "federated.png"
        plot(rows, png)
        when = datetime.date.today().isoformat()
        body = (
            f"## Federated map (`simnet/federated.py`)\n\n{when}, {platform.machine()} "
            f"{platform.processor() or ''}, {os.cpu_count()} cores (irrelevant: virtual time).\n\n"
            f"{text}\n\nEfficiency = speed-up / N with identical cards. 'Mixed cards' uses "
            "random capacity (10-40 GFLOP/s) and load (0-50 %) and compares with the bound "
            "work / total capacity. The killed peer dies halfway; its in-flight item is rerun "
            "elsewhere and every result still arrives exactly once.\n\n![federated](federated.png)"
        )
        write_section(ROOT / "docs" / "benchmarks.md", "federated", body)
    twenty = next(r for r in rows if r["n"] == 20)
    print(headline(ratio_fields("speedup_20", twenty["speedup"])))


if __name__ == "__main__":
    main()
