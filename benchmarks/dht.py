"""Swarm directory at scale: converge time, card and provider lookups, RAM per node.

For N in {10, 25, 50} in-process nodes (simnet, real py-libp2p hosts on loopback):
time to converge (every node up and wired, so any card resolves, from its owner at
worst), time until the first cards sit at their closest peers, card and provider lookup
latency from random nodes with their caches cleared (measured after replication), and
resident memory per node. The same-run baseline is N = 10: each row gives its card
lookup median relative to it (a scaling figure from one swarm per size, not a paired
ratio: the swarms cannot run in interleaved rounds).
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import psutil
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._report import machine, table, write_section
from p2pedge.records.card import CachedModel
from simnet import Swarm
from simnet.join import timed_card_lookup


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def measure(n: int, lookups: int, seed: int) -> dict[str, float]:
    async with Swarm(1, seed=seed, measure_compute=False):
        pass  # load every library once, so the baseline below holds them
    gc.collect()
    rss_before = psutil.Process().memory_info().rss
    async with Swarm(n, seed=seed, measure_compute=False) as swarm:
        rss = (psutil.Process().memory_info().rss - rss_before) / n
        await swarm.replicated.wait()
        rng = random.Random(seed)
        owner = swarm.nodes[rng.randrange(n)]
        owner.announcer.set_models([CachedModel("bench-model@1", "ab" * 32)])
        await owner.announce()
        cards, providers = [], []
        for _ in range(lookups):
            cards.append(await timed_card_lookup(swarm, rng))
            a = rng.choice(swarm.nodes)
            start = time.perf_counter()
            found = await a.peers.find_providers("model/bench-model")
            providers.append((time.perf_counter() - start) * 1000)
            assert owner.peer_id in found or a is owner
        converge = swarm.converge_s
    gc.collect()
    return {
        "n": n,
        "converge_s": converge,
        "replicated_s": swarm.replicated_s,
        "card_p50": statistics.median(cards),
        "card_p95": pct(cards, 0.95),
        "prov_p50": statistics.median(providers),
        "prov_p95": pct(providers, 0.95),
        "rss_mb": rss / 1e6,
    }


def run_one(n: int, lookups: int, seed: int) -> dict[str, float]:
    argv = [
        sys.executable,
        __file__,
        "--one",
        str(n),
        "--lookups",
        str(lookups),
        "--seed",
        str(seed),
    ]
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    result: dict[str, float] = json.loads(out.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", default="10,25,50")
    parser.add_argument("--lookups", type=int, default=40)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--one", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--no-doc", action="store_true", help="do not update docs/benchmarks.md")
    args = parser.parse_args()
    if args.one:
        print(json.dumps(trio.run(measure, args.one, args.lookups, args.seed)))
        return
    # One process per size: RSS freed by a previous swarm would be reused and hide growth.
    results = [run_one(int(n), args.lookups, args.seed) for n in args.sizes.split(",")]
    base = results[0]["card_p50"]
    headers = [
        "nodes",
        "converge s",
        "replicated s",
        "card p50 ms",
        "card p95 ms",
        "provider p50 ms",
        "provider p95 ms",
        "RSS/node MB",
        f"card p50 / N={results[0]['n']:.0f}'s (one swarm each, not paired)",
    ]
    rows = [
        [
            f"{r['n']:.0f}",
            f"{r['converge_s']:.2f}",
            f"{r['replicated_s']:.2f}",
            f"{r['card_p50']:.1f}",
            f"{r['card_p95']:.1f}",
            f"{r['prov_p50']:.1f}",
            f"{r['prov_p95']:.1f}",
            f"{r['rss_mb']:.1f}",
            f"{r['card_p50'] / base:.2f}x",
        ]
        for r in results
    ]
    text = table(headers, rows)
    print(text)
    if not args.no_doc:
        write_section(
            "dht",
            "### Swarm directory (`benchmarks/dht.py`)\n\n"
            f"{machine()}. In-process simnet, real py-libp2p 0.8.1 hosts on 127.0.0.1, "
            f"{args.lookups} lookups of random pairs with caches cleared; targets: 50 nodes "
            "converge in <= 5 s, card lookup median <= 100 ms.\n\n" + text,
        )
    last = results[-1]
    n = f"{last['n']:.0f}"
    print(f"converge_s_{n}={last['converge_s']:.2f} lookup_p50_ms_{n}={last['card_p50']:.1f}")


if __name__ == "__main__":
    main()
