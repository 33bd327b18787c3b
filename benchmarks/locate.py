"""Finding an unknown peer's addresses: ``Directory.locate`` against py-libp2p's
``find_peer``, in one in-process swarm (real py-libp2p hosts on loopback, real bootstrap
from 3 seeds).

Per round a random asker forgets a random target (no address, no routing-table entry),
then both sides look it up, in alternating order. Before each side the asker hangs up on
every peer it was not connected to when the round began, so neither side inherits the
other's connections. Measured per lookup: wall time, the process's CPU time (all nodes
live in this process, so it is the swarm's whole cost of the lookup), and the peers the
asker newly connected to. Ratios are medians of the paired per-round ratios
(locate / find_peer).

    .venv/bin/python benchmarks/locate.py [--nodes 30] [--rounds 25]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._report import headline, machine, paired_ratio, ratio_fields, table, turns
from simnet import Swarm

SEEDS = 3


def _forget(asker: Any, target: Any) -> None:
    asker.directory.dht.routing_table.remove_peer(target.host.get_id())
    asker.host.get_peerstore().clear_addrs(target.host.get_id())


async def _hang_up(asker: Any, keep: set[Any]) -> None:
    for peer in list(asker.host.get_connected_peers()):
        if peer not in keep:
            await asker.host.disconnect(peer)


async def _one(
    asker: Any, target: Any, keep: set[Any], lookup: Callable[[], Awaitable[bool]]
) -> dict[str, float]:
    await _hang_up(asker, keep)
    _forget(asker, target)
    before = set(asker.host.get_connected_peers())
    cpu, wall = time.process_time(), time.perf_counter()
    with trio.move_on_after(30):
        found = await lookup()
    row = {
        "wall_ms": 1000 * (time.perf_counter() - wall),
        "cpu_ms": 1000 * (time.process_time() - cpu),
        "found": float(found),
        "dials": float(len(set(asker.host.get_connected_peers()) - before)),
    }
    return row


async def _find_peer(asker: Any, target: Any) -> bool:
    info = await asker.directory.dht.find_peer(target.host.get_id())
    return info is not None and bool(info.addrs)


async def _locate(asker: Any, target: Any) -> bool:
    return bool(await asker.directory.locate(target.peer_id))


async def bench(args: argparse.Namespace) -> dict[str, str]:
    rng = random.Random(args.seed)
    sides: dict[str, list[dict[str, float]]] = {"find_peer": [], "locate": []}
    async with Swarm(args.nodes, seed=args.seed, measure_compute=False, seeds=SEEDS) as swarm:
        await swarm.replicated.wait()
        for index in range(args.rounds):
            asker, target = rng.sample(swarm.nodes[SEEDS:], 2)
            keep = set(asker.host.get_connected_peers()) - {target.host.get_id()}

            for side in turns(list(sides), index):
                lookup = partial(_find_peer if side == "find_peer" else _locate, asker, target)
                sides[side].append(await _one(asker, target, keep, lookup))
    old, new = sides["find_peer"], sides["locate"]
    cpu = paired_ratio([n["cpu_ms"] for n in new], [o["cpu_ms"] for o in old])
    wall = paired_ratio([n["wall_ms"] for n in new], [o["wall_ms"] for o in old])

    def row(name: str, rows: list[dict[str, float]]) -> list[str]:
        return [
            name,
            f"{statistics.median(r['wall_ms'] for r in rows):.1f}",
            f"{statistics.median(r['cpu_ms'] for r in rows):.1f}",
            f"{statistics.median(r['dials'] for r in rows):.0f}",
            f"{sum(r['found'] for r in rows):.0f}/{len(rows)}",
        ]

    print(f"{machine()}; {args.nodes} in-process nodes, {args.rounds} rounds")
    heads = ["lookup", "wall ms (median)", "CPU ms (median)", "new connections", "found"]
    print(table(heads, [row("py-libp2p find_peer", old), row("Directory.locate", new)]))
    return {
        **ratio_fields("locate_vs_find_peer_cpu", cpu),
        **ratio_fields("locate_vs_find_peer_wall", wall),
        "find_peer_found": f"{sum(r['found'] for r in old) / len(old):.2f}",
        "locate_found": f"{sum(r['found'] for r in new) / len(new):.2f}",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nodes", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=25)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    print(headline(trio.run(bench, args)))


if __name__ == "__main__":
    main()
