"""Swarm directory at scale: converge time, card and provider lookups, RAM per node.

For N in {10, 25, 50} in-process nodes (simnet, real py-libp2p hosts on loopback), each
size twice:

- **real bootstrap** (the headline): every node is given only the addresses of 3 seed
  nodes, dials them, looks its own id up and announces its card, as a deployed node does;
  "join" is when every node has announced;
- **pre-filled tables** (harness shortcut, labelled as such in its rows): simnet fills each
  routing table from a seeded random choice of 20 peers and skips the bootstrap; "join" is
  when every node is up and wired, and cards then replicate to their closest peers.

Then card and provider lookups from random nodes with their caches cleared, the fraction
of card lookups that found the card, and resident memory per node. The same-run baseline
is N = 10: each row gives its card lookup median relative to it (a scaling figure from one
swarm per size, not a paired ratio: the swarms cannot run in interleaved rounds).
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
from typing import Any

import psutil
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._report import machine, table, write_section
from p2pedge.records.card import CachedModel
from simnet import Swarm

SEEDS = 3  # seed nodes of the real-bootstrap swarm
MODES = ("bootstrap", "prefilled")


async def card_lookup(swarm: Swarm, rng: random.Random) -> float | None:
    """Milliseconds for a random node, cache cleared, to fetch a random peer's card; None
    when the lookup did not find it."""
    a, b = rng.sample(swarm.nodes, 2)
    assert a.directory is not None
    a.directory.forget(b.peer_id)
    start = time.perf_counter()
    card = await a.card_of(b.peer_id, refresh=True)
    elapsed = (time.perf_counter() - start) * 1000
    return elapsed if card is not None and card.peer_id == b.peer_id else None


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def measure(n: int, lookups: int, seed: int, mode: str) -> dict[str, Any]:
    async with Swarm(1, seed=seed, measure_compute=False):
        pass  # load every library once, so the baseline below holds them
    gc.collect()
    rss_before = psutil.Process().memory_info().rss
    seeds = SEEDS if mode == "bootstrap" else 0
    async with Swarm(n, seed=seed, measure_compute=False, seeds=seeds) as swarm:
        rss = (psutil.Process().memory_info().rss - rss_before) / n
        await swarm.replicated.wait()
        rng = random.Random(seed)
        owner = swarm.nodes[rng.randrange(n)]
        owner.announcer.set_models([CachedModel("bench-model@1", "ab" * 32)])
        await owner.announce()
        cards: list[float] = []
        providers, missed, no_provider = [], 0, 0
        for _ in range(lookups):
            took = await card_lookup(swarm, rng)
            if took is None:
                missed += 1
            else:
                cards.append(took)
            a = rng.choice(swarm.nodes)
            start = time.perf_counter()
            found = await a.peers.find_providers("model/bench-model")
            providers.append((time.perf_counter() - start) * 1000)
            no_provider += owner.peer_id not in found and a is not owner
        converge = swarm.converge_s
    gc.collect()
    if not cards:
        raise RuntimeError(f"{mode}, {n} nodes: no card lookup succeeded")
    return {
        "mode": mode,
        "found": 1 - missed / lookups,
        "providers_found": 1 - no_provider / lookups,
        "n": n,
        "converge_s": converge,
        "replicated_s": swarm.replicated_s,
        "card_p50": statistics.median(cards),
        "card_p95": pct(cards, 0.95),
        "prov_p50": statistics.median(providers),
        "prov_p95": pct(providers, 0.95),
        "rss_mb": rss / 1e6,
    }


def run_one(n: int, lookups: int, seed: int, mode: str) -> dict[str, Any]:
    argv = [sys.executable, __file__, "--one", str(n), "--lookups", str(lookups)]
    argv += ["--seed", str(seed), "--mode", mode]
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", default="10,25,50")
    parser.add_argument("--lookups", type=int, default=40)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--one", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=MODES, default="bootstrap", help=argparse.SUPPRESS)
    parser.add_argument("--no-doc", action="store_true", help="do not update docs/benchmarks.md")
    args = parser.parse_args()
    if args.one:
        print(json.dumps(trio.run(measure, args.one, args.lookups, args.seed, args.mode)))
        return
    # One process per size and mode: RSS freed by a previous swarm would be reused and
    # hide growth.
    sizes = [int(n) for n in args.sizes.split(",")]
    results = [run_one(n, args.lookups, args.seed, mode) for mode in MODES for n in sizes]
    base = {r["mode"]: r["card_p50"] for r in reversed(results)}  # the smallest size's
    headers = [
        "how nodes join",
        "nodes",
        "join s",
        "cards at closest peers s",
        "cards found",
        "card p50 ms",
        "card p95 ms",
        "provider p50 ms",
        "provider p95 ms",
        "RSS/node MB",
        f"card p50 / N={results[0]['n']:.0f}'s (one swarm each, not paired)",
    ]
    label = {
        "bootstrap": f"real bootstrap from {SEEDS} seeds",
        "prefilled": "pre-filled tables (harness shortcut)",
    }
    rows = [
        [
            label[r["mode"]],
            f"{r['n']:.0f}",
            f"{r['converge_s']:.2f}",
            f"{r['replicated_s']:.2f}",
            f"{r['found']:.0%}",
            f"{r['card_p50']:.1f}",
            f"{r['card_p95']:.1f}",
            f"{r['prov_p50']:.1f}",
            f"{r['prov_p95']:.1f}",
            f"{r['rss_mb']:.1f}",
            f"{r['card_p50'] / base[r['mode']]:.2f}x",
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
            "converge in <= 5 s, card lookup median <= 100 ms. The real bootstrap is the "
            "headline; the pre-filled rows skip Kademlia's bootstrap (harness shortcut).\n\n"
            + text,
        )
    real = [r for r in results if r["mode"] == "bootstrap"][-1]
    shortcut = [r for r in results if r["mode"] == "prefilled"][-1]
    n = f"{real['n']:.0f}"
    print(
        f"join_s_{n}={real['converge_s']:.2f} lookup_p50_ms_{n}={real['card_p50']:.1f} "
        f"found_{n}={real['found']:.2f} prefilled_converge_s_{n}={shortcut['converge_s']:.2f} "
        f"prefilled_lookup_p50_ms_{n}={shortcut['card_p50']:.1f}"
    )


if __name__ == "__main__":
    main()
