"""Route choice from cards alone vs learning from measured decode steps, with replicas
that are slower than their cards say.

Five real Nodes in one process (``simnet.swarm.Swarm``): four serve a tiny random model,
two replicas for blocks 0-3 and two for 3-6 (real onnxruntime, real lanes on 127.0.0.1),
and their cards look alike. In each of ``--assignments`` rounds one replica per range is
made slow by ``ModeledSlowMachine`` (every step sleeps ``--slow-ms`` in the server's
worker thread first: modeled compute, as simnet allows; the protocol code is untouched),
chosen at random. Two client nodes then take turns opening sessions: one chooses routes
from cards and pings only (its step-time table never holds a fresh entry), the other
also from the decode-step times its earlier sessions measured (the default). Each starts
the round with an empty table. Reported: ms per decoded token after each client's first
session of the round, and how many hops went to a slow replica. A round of the ratio is
one session of each client, back to back (the order alternating); learning's speed-up is
the median of the per-round ratios, with its min-max.

    .venv/bin/python -m simnet.route_learning [--assignments 4] [--sessions 4] [--no-doc]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import trio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks._report import (  # noqa: E402
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
from p2pedge.ids import LayerRange  # noqa: E402
from p2pedge.planning.latency import StepTimes  # noqa: E402
from p2pedge.protocols.pipeline.client import ClientConfig  # noqa: E402
from p2pedge.protocols.pipeline.serving import (  # noqa: E402
    open_sharded_session,
    start_pipeline_server,
)
from p2pedge.runtime.config import RuntimeConfig  # noqa: E402
from p2pedge.runtime.shard_session import ShardModel, ShardSession  # noqa: E402
from p2pedge.testing.tiny import build_tiny_model  # noqa: E402
from simnet.swarm import Swarm  # noqa: E402

MODEL = "tiny"
RANGES = [LayerRange(0, 3), LayerRange(0, 3), LayerRange(3, 6), LayerRange(3, 6)]
PROMPT = [5, 17, 42, 99, 100, 101, 7, 8]
POLICIES = ("cards only", "learning")


class ModeledSlowMachine(ShardSession):
    """Modeled compute: a real shard session on a machine ``delay["s"]`` slower per step
    than its card says (busy with other work, thermally throttled, ...)."""

    def __init__(self, model: ShardModel, max_length: int, delay: dict[str, float]) -> None:
        super().__init__(model, max_length)
        self.delay = delay

    def step(self, x: np.ndarray, start: int, *, last_only: bool = True) -> np.ndarray:
        time.sleep(self.delay["s"])  # the server's worker thread, not its event loop
        return super().step(x, start, last_only=last_only)


async def serve_slowable(
    nodes: list[Any], ranges: list[LayerRange], model_dir: Path, work: Path
) -> dict[str, dict[str, float]]:
    """Start a shard server for each range on each node and announce it; returns each
    server's modeled delay (``{"s": seconds}`` per peer, 0 until a caller slows it)."""
    delays: dict[str, dict[str, float]] = {}
    for i, (node, layers) in enumerate(zip(nodes, ranges, strict=True)):
        server = await start_pipeline_server(
            node,
            [(MODEL, model_dir, layers)],
            shards_root=work / f"s{i}",
            runtime=RuntimeConfig(intra_op_threads=1),
        )
        server.costs.inline_budget_s = 0.0  # modeled slow steps must not stall the loop
        model = server.shards[(MODEL, layers)]
        delay = delays[node.peer_id] = {"s": 0.0}

        def slow_session(max_length: int, m: ShardModel = model, d: Any = delay) -> Any:
            return ModeledSlowMachine(m, max_length, d)

        model.new_session = slow_session  # type: ignore[method-assign]
        await node.announce()
    return delays


def never_fresh() -> StepTimes:
    """A step-time table whose entries are stale as soon as they are written."""
    return StepTimes(ttl_s=-1.0)


async def session_ms(client: Any, tokens: int) -> tuple[float, list[str], list[int]]:
    config = ClientConfig(max_length=64, step_timeout=30, logits_top_k=1)
    async with await open_sharded_session(client, MODEL, config=config) as session:
        route = [h.peer_id for h in session.route]
        out = [int(np.argmax(await session.extend(PROMPT)))]
        began = time.perf_counter()
        while len(out) < tokens:
            out.append(int(np.argmax(await session.extend([out[-1]]))))
        per_token = (time.perf_counter() - began) / (tokens - 1)
    return per_token, route, out


async def run(args: Any) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="p2pedge-routes-"))
    model_dir = build_tiny_model(work / MODEL, seed=5, n_layers=6)
    rng = random.Random(args.seed)
    per_token: dict[str, list[float]] = {p: [] for p in POLICIES}
    slow_hops: dict[str, int] = dict.fromkeys(POLICIES, 0)
    hops: dict[str, int] = dict.fromkeys(POLICIES, 0)
    outputs: set[tuple[int, ...]] = set()
    async with Swarm(6, seed=11, measure_compute=False) as swarm:
        cards_client, learning_client, *servers = swarm.nodes
        delays = await serve_slowable(servers, RANGES, model_dir, work)
        by_range: dict[LayerRange, list[str]] = {}
        for node, layers in zip(servers, RANGES, strict=True):
            by_range.setdefault(layers, []).append(node.peer_id)
        for _ in range(args.assignments):
            slow = {rng.choice(peers) for peers in by_range.values()}
            for peer, delay in delays.items():
                delay["s"] = args.slow_ms / 1000 if peer in slow else 0.0
            cards_client.step_times = never_fresh()
            learning_client.step_times = StepTimes()
            clients = dict(zip(POLICIES, (cards_client, learning_client), strict=True))
            for n in range(args.sessions):
                for policy in turns(POLICIES, n):
                    client = clients[policy]
                    seconds, route, out = await session_ms(client, args.tokens)
                    outputs.add(tuple(out))
                    if n == 0:
                        continue  # the first session of a round has nothing measured yet
                    per_token[policy].append(seconds)
                    hops[policy] += len(route)
                    slow_hops[policy] += sum(peer in slow for peer in route)
            print(f"round done: slow replicas {sorted(p[-6:] for p in slow)}", flush=True)
    return {
        "ms": {p: statistics.median(per_token[p]) * 1000 for p in POLICIES},
        "speedup": paired_ratio(per_token["cards only"], per_token["learning"]),
        "slow_share": {p: slow_hops[p] / hops[p] for p in POLICIES},
        "sessions": len(per_token[POLICIES[0]]),
        "same_tokens": len(outputs) == 1,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--assignments", type=int, default=4, help="rounds of slow replicas")
    ap.add_argument("--sessions", type=int, default=4, help="sessions per client per round")
    ap.add_argument("--tokens", type=int, default=12, help="tokens per session")
    ap.add_argument("--slow-ms", type=float, default=20.0, help="modeled slowdown per step")
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--no-doc", action="store_true", help="do not update docs/benchmarks.md")
    args = ap.parse_args(argv)
    r = trio.run(run, args)
    rows = [
        [policy, f"{r['ms'][policy]:.2f}", f"{r['slow_share'][policy]:.0%}", cell]
        for policy, cell in zip(POLICIES, ("baseline", ratio_cell(r["speedup"])), strict=True)
    ]
    headers = ["route choice (slow replicas: modeled delay)", "ms per token, median"]
    headers += ["hops on a slow replica"]
    body = table([*headers, "speed-up vs cards only (min-max)"], rows)
    print(body)
    if not args.no_doc:
        write_section(
            "route_learning",
            "## Route choice learning from measured steps (`simnet/route_learning.py`)\n\n"
            f"{machine()}. Two replicas each for blocks 0-3 and 3-6 of a tiny random model "
            "with identical cards (real Nodes, onnxruntime and lanes in one process); in each "
            f"of {args.assignments} rounds one replica per range, chosen at random, is "
            f"slowed by a modeled {args.slow_ms:g} ms per step. Two clients take turns, "
            f"{args.sessions} sessions each per round of {args.tokens} greedy tokens; each "
            "client's first session of a round is left out (nothing measured yet), so "
            f"{r['sessions']} sessions per client count. Tokens identical everywhere: "
            f"{'yes' if r['same_tokens'] else 'NO'}. A round of the ratio: one counted "
            f"session of each client, back to back. {RATIO_DEFINITION}\n\n" + body,
        )
    fields = ratio_fields("learning_vs_cards", r["speedup"])
    fields["slow_hops_cards"] = f"{r['slow_share']['cards only']:.2f}"
    fields["slow_hops_learning"] = f"{r['slow_share']['learning']:.2f}"
    print(headline(fields))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
