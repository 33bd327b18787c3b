"""``python -m simnet.join --n 50``: start a swarm, report convergence and lookups."""

from __future__ import annotations

import argparse
import random
import statistics
import time

import trio

from simnet import Swarm


async def timed_card_lookup(swarm: Swarm, rng: random.Random) -> float:
    """Milliseconds for a random node, cache cleared, to fetch a random peer's card."""
    a, b = rng.sample(swarm.nodes, 2)
    assert a.directory is not None
    a.directory.forget(b.peer_id)
    start = time.perf_counter()
    card = await a.card_of(b.peer_id, refresh=True)
    elapsed = (time.perf_counter() - start) * 1000
    if card is None or card.peer_id != b.peer_id:
        raise AssertionError(f"lookup of {b.peer_id} from {a.peer_id} failed")
    return elapsed


async def run(n: int, seed: int, lookups: int) -> tuple[float, float]:
    async with Swarm(n, seed=seed, measure_compute=False) as swarm:
        print(f"{n} nodes up and wired (converged) in {swarm.converge_s:.2f} s")
        await swarm.replicated.wait()
        print(f"first cards replicated to their closest peers after {swarm.replicated_s:.2f} s")
        rng = random.Random(seed)
        times = [await timed_card_lookup(swarm, rng) for _ in range(lookups)]
        p50 = statistics.median(times)
        print(f"card lookups: p50 {p50:.1f} ms, max {max(times):.1f} ms over {lookups}")
        return swarm.converge_s, p50


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m simnet.join", description=__doc__)
    parser.add_argument("--n", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lookups", type=int, default=30)
    args = parser.parse_args()
    converge, p50 = trio.run(run, args.n, args.seed, args.lookups)
    print(f"converge_s={converge:.2f} lookup_p50_ms={p50:.1f}")


if __name__ == "__main__":
    main()
