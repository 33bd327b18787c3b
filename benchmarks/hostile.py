"""Hostile peers: honest sharded generation with and without a mixed attack, in one run.

Three honest shard servers (real ``python -m p2pedge.node`` processes, thirds of SmolLM2,
each with a fixed lane port) and an honest client in this process, which also publishes the
model into its store so that peers can pull from it. Each round decodes greedily through
the servers twice, once calm and once while an attacker process
(``benchmarks/_attacker.py``: a real node on another source address) runs a mixed load
against the servers and the client's blob service: malformed messages on every protocol,
session hoarding, 255-token step floods, unread blob replies, silent lane connections,
junk DHT puts and a pull source that claims the model and never answers. After each decode,
another honest node in this process pulls a few files of the model from the swarm. The
order of calm and attack alternates per round.

Reported: honest tok/s calm and under attack, and their ratio as the median of the paired
per-round ratios with its min-max spread; tokens that differ from the calm reference;
crashes (an honest server process that exited, a generation that raised, or a pull that
failed); the RSS growth
of the honest processes during attack rounds over their size after warm-up; and the
verified-computation section's detection latency (corrupted steps before the ban).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, cast

import psutil
import trio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks._attacker import ATTACKS, free_port  # noqa: E402
from benchmarks._detection import measure, section  # noqa: E402
from benchmarks._pulls import timed_pull  # noqa: E402
from benchmarks._report import machine, paired_ratio, table, write_section  # noqa: E402
from benchmarks._shard_servers import stop  # noqa: E402
from p2pedge.models.keys import TrustStore, generate_key, public_key_hex  # noqa: E402
from p2pedge.node.config import NodeConfig, Tuning  # noqa: E402
from p2pedge.node.node import Node  # noqa: E402
from p2pedge.testing.tiny import REAL_MODEL_NAME, models_dir  # noqa: E402

MODEL = "smollm2-135m-instruct"
THIRDS = ((0, 10), (10, 20), (20, 30))
PROMPT = [{"role": "user", "content": "Write a short story about a robot who learns to paint."}]
STEP_TIMEOUT = 30.0
PULL_FILES = ("tokenizer.json", "tokenizer_config.json", "p2pedge_model.json")
MB = 1 << 20


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    peer_id: str
    addr: str
    layers: tuple[int, int]
    lane_port: int


def _drain(pipe: IO[bytes]) -> None:
    for _ in pipe:
        pass


def start_server(model_dir: Path, root: Path, i: int, boot: str | None) -> Server:
    layers = THIRDS[i]
    lane_port = free_port()
    name = f"honest{i}"
    (root / name).mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "p2pedge.node", "--json", "--threads", "1"]
    cmd += ["--data-dir", str(root / name), "--model", f"{MODEL}={model_dir}"]
    cmd += ["--serve", f"{MODEL}:{layers[0]}-{layers[1]}", "--lane-port", str(lane_port)]
    cmd += ["--bootstrap", boot] if boot else []
    err = (root / name / "stderr.log").open("wb")
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=err, env={**os.environ, "PYTHONUNBUFFERED": "1"}
    )
    assert proc.stdout is not None
    for line in proc.stdout:
        event = json.loads(line)
        if event["event"] == "listening":
            threading.Thread(target=_drain, args=(proc.stdout,), daemon=True).start()
            return Server(proc, str(event["peer_id"]), str(event["addrs"][0]), layers, lane_port)
    raise RuntimeError(f"server {name} exited; see {root / name / 'stderr.log'}")


class Attacker:
    """The attacker process for one round: started before the timed run, stopped after."""

    def __init__(self, targets: Path) -> None:
        self.targets = targets
        self.proc: subprocess.Popen[bytes] | None = None
        self.counts: dict[str, int] = {}

    def start(self) -> None:
        cmd = [sys.executable, "-m", "benchmarks._attacker", str(self.targets)]
        err = (self.targets.parent / "attacker.log").open("ab")
        # niced: a real attacker brings its own CPU; here it shares the honest side's two
        # cores, and only the work its messages cause in honest processes should count
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=err, cwd=ROOT, preexec_fn=lambda: os.nice(19)
        )
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if json.loads(line)["event"] == "attacking":
                return
        raise RuntimeError("attacker exited before attacking; see attacker.log")

    def stop(self) -> dict[str, int]:
        assert self.proc is not None and self.proc.stdout is not None
        self.proc.send_signal(signal.SIGINT)
        counts: dict[str, int] = {}
        for line in self.proc.stdout:
            event = json.loads(line)
            if event["event"] == "counts":
                counts = event["counts"]
        self.proc.wait(timeout=30)
        return counts


class RssWatch:
    """Peak RSS of the honest processes, sampled while a round runs (a measure, not a wait)."""

    def __init__(self, pids: list[int]) -> None:
        self.procs = [psutil.Process(pid) for pid in pids]
        self.base = self.sample()
        self.peak = list(self.base)

    def sample(self) -> list[int]:
        return [p.memory_info().rss if p.is_running() else 0 for p in self.procs]

    async def run(self) -> None:
        while True:
            for i, rss in enumerate(self.sample()):
                self.peak[i] = max(self.peak[i], rss)
            await trio.sleep(0.2)

    def growth_mb(self) -> float:
        return max(peak - base for peak, base in zip(self.peak, self.base, strict=True)) / MB


async def rounds(
    node: Node,
    attacker: Attacker,
    servers: list[Server],
    tokens: int,
    n_rounds: int,
    pull: Callable[[str], Awaitable[float | None]],
) -> dict[str, Any]:
    reference = await node.complete(MODEL, messages=PROMPT, max_tokens=tokens, route="sharded")
    expected = list(reference.token_ids)
    rates: dict[str, list[float]] = {"calm": [], "attack": []}
    pulls: dict[str, list[float]] = {"calm": [], "attack": []}
    wrong = crashes = failed_pulls = 0
    counts: dict[str, int] = {}
    watch = RssWatch([s.proc.pid for s in servers] + [os.getpid()])
    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch.run)
        for r in range(n_rounds):
            for kind in ("calm", "attack") if r % 2 == 0 else ("attack", "calm"):
                if kind == "attack":
                    await trio.to_thread.run_sync(attacker.start)
                try:
                    done = await node.complete(
                        MODEL, messages=PROMPT, max_tokens=tokens, route="sharded"
                    )
                    rates[kind].append(done.tok_per_s)
                    wrong += list(done.token_ids) != expected
                    took = await pull(f"{r}-{kind}")  # while the attacker (if any) runs
                    if took is None:
                        failed_pulls += 1
                    else:
                        pulls[kind].append(took)
                except Exception as exc:  # a crash of the honest path is what we count
                    print(f"{kind} round {r}: generation failed: {exc!r}", flush=True)
                    crashes += 1
                    rates[kind].append(0.0)
                finally:
                    if kind == "attack":
                        for key, value in (await trio.to_thread.run_sync(attacker.stop)).items():
                            counts[key] = counts.get(key, 0) + value
        nursery.cancel_scope.cancel()
    crashes += sum(s.proc.poll() is not None for s in servers)
    return {
        "rates": rates,
        "pulls": pulls,
        "failed_pulls": failed_pulls,
        "wrong": wrong,
        "crashes": crashes,
        "rss_growth_mb": watch.growth_mb(),
        "rss_base_mb": [b / MB for b in watch.base],
        "counts": counts,
        "tokens": len(expected),
    }


async def run(args: argparse.Namespace, model_dir: Path, root: Path) -> tuple[str, dict[str, str]]:
    servers: list[Server] = []
    try:
        servers.append(start_server(model_dir, root, 0, None))
        for i in (1, 2):
            servers.append(start_server(model_dir, root, i, servers[0].addr))
        config = NodeConfig(
            data_dir=root / "client",
            bootstrap=tuple(s.addr for s in servers),
            model_dirs=((MODEL, model_dir),),
            tuning=Tuning(measure_compute=False, shard_step_timeout=STEP_TIMEOUT, threads=1),
        )
        puller_config = dataclasses.replace(
            config, data_dir=root / "puller", model_dirs=(), bootstrap=(servers[0].addr,)
        )
        async with Node(config) as node, Node(puller_config) as puller:
            key = generate_key()
            manifest = await node.publish(model_dir, f"{MODEL}@1", key)
            trust = TrustStore([public_key_hex(key)])

            async def pull(name: str) -> float | None:
                into = root / "pulls" / name
                shutil.rmtree(into, ignore_errors=True)
                return await timed_pull(puller, f"{MODEL}@1", into, trust, PULL_FILES)

            targets = {
                "attacks": args.attacks.split(",") if args.attacks else list(ATTACKS),
                "data_dir": str(root / "attacker"),
                "servers": [
                    {
                        "peer_id": s.peer_id,
                        "addr": s.addr,
                        "layers": list(s.layers),
                        "lane_port": s.lane_port,
                        "model": MODEL,
                    }
                    for s in servers
                ],
                "blob": {
                    "peer_id": node.peer_id,
                    "digests": [
                        f.sha256 for f in sorted(manifest.files, key=lambda f: -f.size)[:4]
                    ],
                },
            }
            path = root / "targets.json"
            path.write_text(json.dumps(targets))
            result = await rounds(node, Attacker(path), servers, args.tokens, args.rounds, pull)
    finally:
        stop(cast("list[Any]", servers))  # _shard_servers.stop needs only each .proc
    detection = await measure(MODEL, model_dir, 30, args.tokens, args.rounds, args.trials)
    ratio = paired_ratio(result["rates"]["attack"], result["rates"]["calm"])
    signing = signing_cost()
    body = (
        report(result, ratio, args)
        + "\n\n"
        + section(detection, args.tokens, args.rounds, args.trials)
        + "\n\n"
        + table(
            ("signed outputs, per hop of a decode step (576 floats)", "µs, median"),
            [
                ("server: input chain, output hash, Ed25519 signature", f"{signing['server']:.0f}"),
                ("client: output hash, signature check", f"{signing['client']:.0f}"),
            ],
        )
    )
    headline = {
        "crashes": str(result["crashes"] + result["failed_pulls"]),
        "wrong_tokens": str(result["wrong"] + detection.wrong),
        "honest_vs_calm": f"{ratio.median:.2f}",
        "honest_vs_calm_min": f"{ratio.low:.2f}",
        "honest_vs_calm_max": f"{ratio.high:.2f}",
        "detect_steps_p95": str(detection.p95),
        "rss_growth_mb": f"{result['rss_growth_mb']:.0f}",
        "check_cost_1_in_50": f"{detection.cost[1 / 50].median:.2f}",
        "sign_us_per_hop": f"{signing['server'] + signing['client']:.0f}",
    }
    return body, headline


def signing_cost(hidden: int = 576, repeats: int = 2000) -> dict[str, float]:
    """Microseconds per hop that signed outputs add to a decode step (one position of
    SmolLM2's width): the server's input chain, output hash and Ed25519 signature; the
    client's output hash and verification. Median of ``repeats`` timed in-process."""
    import numpy as np
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    from p2pedge.ids import LayerRange
    from p2pedge.protocols.pipeline.attest import (
        InputChain,
        chain_seed,
        output_digest,
        reply_digest,
        signature_ok,
    )

    key = Ed25519PrivateKey.generate()
    public = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    x = np.random.default_rng(0).standard_normal((1, 1, hidden)).astype(np.float32)
    chain = InputChain(chain_seed(MODEL, LayerRange(10, 20), 1))
    server, client = [], []
    for i in range(repeats):
        began = time.perf_counter()
        value = chain.extend(i % 256, x)
        sig = key.sign(reply_digest(value, i % 256, i % 256 + 1, output_digest(x)))
        mid = time.perf_counter()
        digest = reply_digest(value, i % 256, i % 256 + 1, output_digest(x))
        assert signature_ok(public, digest, sig)
        client.append(time.perf_counter() - mid)
        server.append(mid - began)
    return {
        "server": statistics.median(server) * 1e6,
        "client": statistics.median(client) * 1e6,
    }


def _median(values: list[float]) -> str:
    return f"{statistics.median(values):.2f}" if values else "-"


def report(result: dict[str, Any], ratio: Any, args: argparse.Namespace) -> str:
    calm, attack = result["rates"]["calm"], result["rates"]["attack"]
    rows = [
        ("honest sharded tok/s, calm", f"{statistics.median(calm):.1f}", "-"),
        ("honest sharded tok/s, under attack", f"{statistics.median(attack):.1f}", "-"),
        (
            "under attack / calm (median of paired per-round ratios, min-max)",
            f"{ratio.median:.2f} ({ratio.low:.2f}-{ratio.high:.2f})",
            ">= 0.7",
        ),
        ("tokens different from the calm reference", str(result["wrong"]), "0"),
        ("crashes (server exits, failed generations)", str(result["crashes"]), "0"),
        ("RSS growth of honest processes during attacks", f"{result['rss_growth_mb']:.0f} MB", "-"),
        (
            f"pull of {len(PULL_FILES)} files by another honest node, calm / under attack "
            "(a hanging source claims the model), median s",
            f"{_median(result['pulls']['calm'])} / {_median(result['pulls']['attack'])}",
            "succeeds",
        ),
        ("pulls that failed", str(result["failed_pulls"]), "0"),
    ]
    counts = sorted(result["counts"].items())
    return "\n\n".join(
        [
            f"{args.rounds} rounds of {result['tokens']} greedy tokens, calm and under attack "
            "in alternating order. Harness shortcut: the attacker process shares the two "
            "cores with the honest processes (a real attacker brings its own CPU).",
            table(("figure", "measured", "target"), rows),
            "What the attacker's attempts got back (kind:outcome = count):\n\n"
            + ", ".join(f"`{k}` {v}" for k, v in counts),
        ]
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=32, help="new tokens per run")
    ap.add_argument("--rounds", type=int, default=5, help="paired calm/attack rounds")
    ap.add_argument("--trials", type=int, default=5, help="detection trials per pattern")
    ap.add_argument("--attacks", default="", help=f"comma-separated subset of {list(ATTACKS)}")
    ap.add_argument("--no-doc", action="store_true", help="do not update docs/benchmarks.md")
    args = ap.parse_args(argv)
    model_dir = models_dir() / REAL_MODEL_NAME
    if not (model_dir / "model.onnx").is_file():
        print(f"missing {model_dir}; run `make model`", file=sys.stderr)
        return 2
    root = ROOT / ".cache" / "bench-hostile"
    began = time.perf_counter()
    body, headline = trio.run(run, args, model_dir, root)
    print(body)
    print(f"(took {time.perf_counter() - began:.0f} s)")
    if not args.no_doc:
        title = "## Hostile peers (`benchmarks/hostile.py`): SmolLM2 in thirds under attack"
        write_section("hostile", f"{title}\n\n{machine()}\n\n{body}\n")
    print(" ".join(f"{key}={value}" for key, value in headline.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
