"""Verified computation for ``benchmarks/hostile.py``: what checks cost, how fast they catch.

In-process nodes (``simnet.swarm.Swarm``, real py-libp2p hosts on loopback, one process)
serve a model in thirds with replicas of the later thirds; the client's route is fixed
(first third, a middle replica, a last replica) so that every check has an auditor.

- **Cost**: per-token time of greedy decoding at check rates 0, 1/50, 1/10 and 1 in paired
  rounds (the order rotating), as the median of per-round ratios against no checks.
- **Detection**: a middle server corrupts every step, 1 step in 50, or every second
  session (``p2pedge.testing.hostile.CorruptingShard``); per trial, the corrupted steps
  before the ban, and whether the delivered tokens differ from an honest run's.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks._report import Ratio, paired_ratio, turns
from p2pedge.ids import LayerRange
from p2pedge.planning.routes import Hop
from p2pedge.planning.verification import VerifyPolicy
from p2pedge.protocols.pipeline.client import ClientConfig
from p2pedge.protocols.pipeline.serving import start_pipeline_server
from p2pedge.runtime.config import RuntimeConfig
from p2pedge.testing.hostile import CorruptingShard, Corruption, trial
from simnet.swarm import Swarm

PROMPT = [5, 17, 42, 99, 100, 101, 7, 8, 9, 250]
FRACTIONS = (1 / 50, 1 / 10, 1.0)
PATTERNS = {
    "every step": Corruption(scale=0.5),
    "1 step in 50": Corruption(every=50, scale=0.5),
    "every second session": Corruption(scale=0.5, sessions=frozenset(range(1, 1000, 2))),
}


@dataclass
class Detection:
    cost: dict[float, Ratio] = field(default_factory=dict)
    ms_per_token: dict[float, float] = field(default_factory=dict)
    caught: dict[str, list[int]] = field(default_factory=dict)  # corrupted steps before ban
    missed: dict[str, int] = field(default_factory=dict)
    wrong: int = 0
    trials: int = 0

    @property
    def p95(self) -> int:
        steps = sorted(s for v in self.caught.values() for s in v)
        return steps[min(len(steps) - 1, int(0.95 * len(steps)))] if steps else -1


async def measure(
    model: str, model_dir: Path, n_layers: int, tokens: int, rounds: int, trials: int
) -> Detection:
    out = Detection()
    tmp = Path(tempfile.mkdtemp(prefix="p2pedge-detect-"))
    t = n_layers // 3
    ranges = [LayerRange(0, t), *[LayerRange(t, 2 * t)] * 2, *[LayerRange(2 * t, n_layers)] * 2]
    async with Swarm(1 + len(ranges), seed=31, measure_compute=False) as swarm:
        servers = []
        for node, layers in zip(swarm.nodes[1:], ranges, strict=True):
            servers.append(
                await start_pipeline_server(
                    node,
                    [(model, model_dir, layers)],
                    shards_root=tmp / "shards",
                    runtime=RuntimeConfig(intra_op_threads=1),
                )
            )
            await node.announce()
        client = swarm.nodes[0]
        peers = [n.peer_id for n in swarm.nodes[1:]]
        route = [Hop(peers[0], ranges[0]), Hop(peers[1], ranges[1]), Hop(peers[3], ranges[3])]
        base: dict[str, Any] = dict(
            max_length=len(PROMPT) + tokens + 2, chunk=16, step_timeout=30, logits_top_k=1
        )
        base["slowdown"] = None
        honest = await trial(client, model, n_layers, route, ClientConfig(**base), PROMPT, tokens)
        times: dict[float, list[float]] = {f: [] for f in (0.0, *FRACTIONS)}
        for r in range(rounds):
            for f in turns(list(times), r):
                verify = VerifyPolicy(fraction=f, seed=r) if f else None
                config = ClientConfig(**base, verify=verify)
                began = time.perf_counter()
                res = await trial(client, model, n_layers, route, config, PROMPT, tokens)
                times[f].append((time.perf_counter() - began) / tokens)
                out.wrong += res.tokens != honest.tokens
        for f in FRACTIONS:
            out.cost[f] = paired_ratio(times[f], times[0.0])
        out.ms_per_token = {f: statistics.median(v) * 1e3 for f, v in times.items()}
        bad = CorruptingShard(servers[1], Corruption(), on=False)
        for name, pattern in PATTERNS.items():
            bad.pattern, bad.on = pattern, True
            bad._sessions.clear()
            out.caught[name], out.missed[name] = [], 0
            for seed in range(trials):
                config = ClientConfig(**base, verify=VerifyPolicy(seed=100 + seed))
                res = await trial(client, model, n_layers, route, config, PROMPT, tokens, bad, {})
                out.trials += 1
                out.wrong += res.tokens != honest.tokens
                if res.detected:
                    out.caught[name].append(res.corrupted_before_ban)
                elif res.corrupted:
                    out.missed[name] += 1
        bad.restore()
    return out


def section(d: Detection, tokens: int, rounds: int, trials: int) -> str:
    rows = [f"| check rate {f:.3g} | {d.ms_per_token[f]:.1f} | {d.cost[f]} |" for f in FRACTIONS]
    cost = "\n".join(
        [
            "| client checks | ms per token | vs no checks (median of per-round ratios, min-max) |",
            "|---|---:|---:|",
            f"| none | {d.ms_per_token[0.0]:.1f} | 1.00x |",
            *rows,
        ]
    )
    found = "\n".join(
        [
            "| a middle server corrupts | trials caught | corrupted steps before the ban | "
            "missed |",
            "|---|---:|---|---:|",
            *[
                f"| {name} | {len(d.caught[name])} | "
                f"{sorted(d.caught[name]) if d.caught[name] else '-'} | {d.missed[name]} |"
                for name in PATTERNS
            ],
        ]
    )
    return (
        f"Verified computation, in-process nodes on loopback (harness: one process), {tokens} "
        f"greedy tokens, route first third / middle replica / last replica, {rounds} paired "
        f"rounds for cost, {trials} trials per pattern at the default policy (1 token in 20 "
        "plus the first and last). An auditor re-runs every position of a checked hop, so "
        "the rate sets how soon a check comes, not how much is recomputed.\n\n"
        f"{cost}\n\n{found}\n\nRuns whose tokens differ from the honest run's: {d.wrong}."
    )
