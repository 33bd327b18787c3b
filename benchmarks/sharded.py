"""Sharded vs local decode of SmolLM2-135M-Instruct (lossless 4-bit), per-hop latency,
and throughput with 1 vs 4 concurrent sessions, all in one run on this machine.

Shard servers are real ``python -m p2pedge.node --serve`` processes on 127.0.0.1 with
``--threads 1`` and ``--inline-step-ms 100`` (``--inline-step-ms`` here changes it); the
client is an in-process :class:`~p2pedge.node.node.Node` with ``threads=1`` too, so local
and sharded decode each get one compute thread per step.

1. ``node.complete`` greedy on one prompt, ``route="local"`` and ``route="sharded"``
   (three servers: blocks 0-10, 10-20, 20-30), interleaved, median decode tok/s of R runs;
   then again with the three servers pinned to one CPU (Linux), the client left free.
2. Concurrency: decode tok/s summed over 4 sessions decoding at once through the same
   three servers, divided by the rate of one session alone.
3. Added latency per hop: a fourth server holds all 30 blocks. A 1-hop chain (that
   server) and two 3-hop chains (one pushing server to server, one relayed by the
   client) decode the same tokens in lock-step, taking turns to go first; all do the same
   compute, so per token ``(t3 - t1) / 2`` is what each of the two extra servers adds
   (framing, msgpack, loopback TCP, process wake-ups, one more onnxruntime run, the
   client's bookkeeping). Two more 3-hop chains decode the same tokens round a ring (the
   default for greedy: the last server feeds each token to the first), one of them quiet
   (only the last server answers the client); a ring runs ahead by itself, so the rings
   take turns with the lock-step chains in blocks of 8 tokens, their per-token time is
   the gap between tokens, and each pairs with the 1-hop chain's step at the same
   position. The client also runs the three shard graphs itself on the
   same tokens, so each relayed hop's round trip splits into compute and the rest.

Run ``make model`` first, then
``python benchmarks/sharded.py [--tokens N] [--rounds R] [--inline-step-ms MS]``;
server data (and the shard graphs built on first use) stay in ``.cache/bench-sharded``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import aclosing
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import numpy.typing as npt
import psutil
import trio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks._report import machine, table, write_section  # noqa: E402
from p2pedge.ids import LayerRange  # noqa: E402
from p2pedge.node.config import NodeConfig  # noqa: E402
from p2pedge.node.node import Node  # noqa: E402
from p2pedge.planning.routes import Hop, ServerOption  # noqa: E402
from p2pedge.protocols._stream import FramedStream  # noqa: E402
from p2pedge.protocols.pipeline.client import ClientConfig, ShardedSession  # noqa: E402
from p2pedge.protocols.pipeline.serving import (  # noqa: E402
    ensure_shard_dir,
    open_sharded_session,
)
from p2pedge.runtime.config import RuntimeConfig  # noqa: E402
from p2pedge.runtime.shard_session import ShardModel, ShardSession  # noqa: E402
from p2pedge.runtime.text import TextCodec  # noqa: E402
from p2pedge.testing.tiny import REAL_MODEL_NAME, models_dir  # noqa: E402

MODEL = "smollm2-135m-instruct"
N_LAYERS = 30
THIRDS = ("0-10", "10-20", "20-30")
PROMPT = [{"role": "user", "content": "Write a short story about a robot who learns to paint."}]
CONCURRENT_PROMPTS = [
    "Write a short story about a robot who learns to paint.",
    "Explain how a bicycle works to a ten year old.",
    "Describe a walk through a forest in autumn.",
    "Write a letter to a friend about your new garden.",
]
STEP_TIMEOUT = 30.0
# every server inlines its decode steps, so the 0-30 server (about 45 ms a step here, near
# the 50 ms default) is served like the thirds and the 1-hop vs 3-hop difference is hops
INLINE_STEP_MS = 100
WARMUP_TOKENS = 8
RING_BLOCK = 8  # tokens per turn when rings and lock-step chains take turns
CONCURRENT_TOKENS = 32


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    peer_id: str
    addr: str
    layers: str


def _drain(pipe: IO[bytes]) -> None:
    for _ in pipe:
        pass


def start_server(
    model_dir: Path,
    root: Path,
    name: str,
    layers: str,
    boot: str | None,
    inline_step_ms: float = INLINE_STEP_MS,
) -> Server:
    cmd = [sys.executable, "-m", "p2pedge.node", "--json", "--threads", "1"]
    cmd += ["--inline-step-ms", str(inline_step_ms)]
    cmd += ["--data-dir", str(root / name), "--model", f"{MODEL}={model_dir}"]
    cmd += ["--serve", f"{MODEL}:{layers}", *(["--bootstrap", boot] if boot else [])]
    (root / name).mkdir(parents=True, exist_ok=True)
    err = (root / name / "stderr.log").open("wb")
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=err, env={**os.environ, "PYTHONUNBUFFERED": "1"}
    )
    assert proc.stdout is not None
    for line in proc.stdout:
        event = json.loads(line)
        if event["event"] == "listening":
            threading.Thread(target=_drain, args=(proc.stdout,), daemon=True).start()
            return Server(proc, str(event["peer_id"]), str(event["addrs"][0]), layers)
    raise RuntimeError(f"server {name} exited; see {root / name / 'stderr.log'}")


def stop(servers: Sequence[Server]) -> None:
    for server in servers:
        if server.proc.poll() is None:
            server.proc.send_signal(signal.SIGINT)
    for server in servers:
        try:
            server.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            server.proc.wait()


def client_config(root: Path, name: str, servers: Sequence[Server], model_dir: Path) -> NodeConfig:
    return NodeConfig(
        data_dir=root / name,
        bootstrap=tuple(s.addr for s in servers),
        model_dirs=((MODEL, model_dir),),
        threads=1,
        measure_compute=False,
        shard_step_timeout=STEP_TIMEOUT,
    )


def pct(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


# --- 1. local vs sharded through node.complete ------------------------------------------


async def local_vs_sharded(node: Node, tokens: int, rounds: int) -> dict[str, Any]:
    for route in ("local", "sharded"):  # warm-up: load the model, dial the servers
        await node.complete(MODEL, messages=PROMPT, max_tokens=4, route=route)
    rates: dict[str, list[float]] = {"local": [], "sharded": []}
    cpu: dict[str, list[float]] = {"local": [], "sharded": []}
    ids: dict[str, list[int]] = {}
    me = psutil.Process()
    for r in range(rounds):
        order = ("local", "sharded") if r % 2 == 0 else ("sharded", "local")
        for route in order:
            before = sum(me.cpu_times()[:2])
            done = await node.complete(MODEL, messages=PROMPT, max_tokens=tokens, route=route)
            cpu[route].append((sum(me.cpu_times()[:2]) - before) / len(done.token_ids))
            rates[route].append(done.tok_per_s)
            ids[route] = list(done.token_ids)
    return {
        "local": statistics.median(rates["local"]),
        "sharded": statistics.median(rates["sharded"]),
        # each round's two runs are adjacent, so their ratio cancels drift between rounds
        "paired": statistics.median(
            s / loc for s, loc in zip(rates["sharded"], rates["local"], strict=True)
        ),
        "local_runs": rates["local"],
        "sharded_runs": rates["sharded"],
        "cpu_local": statistics.median(cpu["local"]),
        "cpu_client": statistics.median(cpu["sharded"]),
        "same_tokens": ids["local"] == ids["sharded"],
        "n_tokens": len(ids["sharded"]),
    }


def pin(pids: Sequence[int], cpus: set[int]) -> None:
    """Set the CPU affinity of every thread of each process (Linux)."""
    for pid in pids:
        for task in Path(f"/proc/{pid}/task").iterdir():
            os.sched_setaffinity(int(task.name), cpus)


def can_pin() -> bool:
    return hasattr(os, "sched_setaffinity") and len(os.sched_getaffinity(0)) >= 2


async def pinned_local_vs_sharded(
    node: Node, servers: Sequence[Server], tokens: int, rounds: int
) -> dict[str, Any] | None:
    """Section 1 again with the three servers sharing one CPU (the client keeps the rest):
    what is left when the co-located processes stop trading places on the vCPUs."""
    if not can_pin():
        return None
    every = os.sched_getaffinity(0)
    pids = [s.proc.pid for s in servers]
    pin(pids, {max(every)})
    try:
        return await local_vs_sharded(node, tokens, rounds)
    finally:
        pin(pids, every)


# --- 2. 1 vs 4 concurrent sessions ------------------------------------------------------


async def decode_rate(
    sessions: Sequence[ShardedSession], prompts: Sequence[list[int]], n: int
) -> float:
    """Total decode tokens/s of all sessions at once, greedy through ``stream`` (round the
    ring, as ``node.generate`` goes): ``n`` tokens each after the first, over the time from
    the first session's first token to the last session's last."""
    firsts: list[float] = [0.0] * len(sessions)
    lasts: list[float] = [0.0] * len(sessions)

    async def run(i: int) -> None:
        async with aclosing(sessions[i].stream(prompts[i], n + 1)) as tokens:
            async for _ in tokens:
                lasts[i] = time.perf_counter()
                firsts[i] = firsts[i] or lasts[i]

    async with trio.open_nursery() as nursery:
        for i in range(len(sessions)):
            nursery.start_soon(run, i)
    if sum(s.ring_steps for s in sessions) != len(sessions) * n:
        raise RuntimeError("not every decode step came round a ring")
    return len(sessions) * n / (max(lasts) - min(firsts))


async def concurrency(node: Node, codec: TextCodec, tokens: int, rounds: int) -> dict[str, Any]:
    prompts = [
        codec.prompt_ids(messages=[{"role": "user", "content": p}], prompt=None)
        for p in CONCURRENT_PROMPTS
    ]
    config = ClientConfig(
        max_length=max(map(len, prompts)) + tokens + 2, step_timeout=STEP_TIMEOUT, logits_top_k=1
    )
    rates: dict[int, list[float]] = {1: [], 4: []}
    for _ in range(rounds):
        for width in (1, 4):
            sessions = [
                await open_sharded_session(node, MODEL, config=config) for _ in range(width)
            ]
            try:
                rates[width].append(await decode_rate(sessions, prompts[:width], tokens))
            finally:
                for session in sessions:
                    await session.aclose()
    one, four = statistics.median(rates[1]), statistics.median(rates[4])
    return {"one": one, "four": four, "speedup": four / one, "runs": rates}


# --- 3. added latency per hop: 1-hop vs 3-hop chain in lock-step --------------------------


async def chain(
    node: Node,
    route: list[Hop],
    max_length: int,
    *,
    push: bool = False,
    ring: bool = False,
    quiet: bool = False,
) -> ShardedSession:
    async def find() -> list[ServerOption]:
        return []  # routes are fixed here; a failure should surface, not be re-planned

    async def opener(peer: str, protocol: str) -> FramedStream:
        return await node.lanes.open(peer, protocol, timeout=STEP_TIMEOUT)  # as node.complete

    config = ClientConfig(
        max_length=max_length,
        step_timeout=STEP_TIMEOUT,
        max_recoveries=0,
        logits_top_k=1,
        push=push,
        ring=ring,
        ring_quiet=quiet,
    )
    session = ShardedSession(opener, find, MODEL, N_LAYERS, config)
    await session.start(route=route)
    return session


def in_process_thirds(root: Path, model_dir: Path) -> list[ShardModel]:
    """The servers' own shard graphs loaded in this process (1 thread), for a compute-only
    baseline of each hop measured in the same rounds."""
    models = []
    for i, layers in enumerate(THIRDS):
        shard_dir = ensure_shard_dir(
            model_dir, LayerRange.parse(layers), root / f"shard{i}" / "shards"
        )
        models.append(ShardModel.from_dir(shard_dir, RuntimeConfig(intra_op_threads=1)))
    return models


def compute_only(thirds: Sequence[ShardSession], x: npt.NDArray[Any], start: int) -> list[float]:
    """Seconds each third takes on ``x`` at ``start``, chained as the servers would."""
    took = []
    for shard in thirds:
        began = time.perf_counter()
        x = shard.step(x, start)
        took.append(time.perf_counter() - began)
    return took


async def timed_extend(session: ShardedSession, token: int) -> tuple[float, int, list[float]]:
    before = [h.conn.busy_seconds for h in session.hops]
    start = time.perf_counter()
    logits = await session.extend([token])
    took = time.perf_counter() - start
    hops = [h.conn.busy_seconds - b for h, b in zip(session.hops, before, strict=True)]
    return took, int(np.argmax(logits)), hops


async def ring_block(
    session: ShardedSession, feed: list[int], at: int, n: int
) -> tuple[dict[int, tuple[float, int]], int]:
    """``n`` tokens from ``session.stream(feed)`` (``feed`` goes in at position ``at``):
    for each token after the first, the seconds since the one before and the token, keyed
    by the position whose step produced it (round the ring); and the last token."""
    out: dict[int, tuple[float, int]] = {}
    previous, position, token = 0.0, at + len(feed), -1
    async with aclosing(session.stream(feed, n)) as stream:
        async for token in stream:
            now = time.perf_counter()
            if previous:
                out[position] = (now - previous, token)
                position += 1
            previous = now
    return out, token


async def in_lock_step(
    chains: Sequence[ShardedSession],
    local: Sequence[ShardSession],
    at: int,
    token: int,
    n: int,
) -> dict[str, Any]:
    """``n`` tokens (``token`` fed at position ``at``, then each next one) through the
    1-hop, relayed and pushed chains in lock-step, each going first, second and third in
    turn, and the same blocks in-process per token."""
    out: dict[str, Any] = {k: [] for k in ("t1", "t3", "t3p", "hops", "compute", "positions")}
    out["tokens"], out["mismatches"] = [], 0
    for i in range(n):
        position = at + i
        timed: dict[int, tuple[float, int, list[float]]] = {}
        for j in range(3):
            k = (i + j) % 3
            timed[k] = await timed_extend(chains[k], token)
        out["compute"].append(compute_only(local, np.asarray([[token]]), position))
        out["mismatches"] += len({timed[k][1] for k in timed}) != 1
        token = timed[1][1]
        out["tokens"].append(token)
        out["positions"].append(position)
        out["t1"].append(timed[0][0])
        out["t3"].append(timed[1][0])
        out["t3p"].append(timed[2][0])
        out["hops"].append(timed[1][2])
    return out


async def hop_latency(
    node: Node,
    whole: Server,
    thirds: Sequence[Server],
    prompt: list[int],
    tokens: int,
    rounds: int,
    local_thirds: Callable[[], list[ShardSession]],
) -> dict[str, Any]:
    one_route = [Hop(whole.peer_id, LayerRange.parse(whole.layers))]
    three_route = [Hop(s.peer_id, LayerRange.parse(s.layers)) for s in thirds]
    t1s: list[float] = []
    t3s: list[float] = []
    t3ps: list[float] = []
    t3rs: list[float] = []
    t3qs: list[float] = []
    t1_ring: list[float] = []  # the 1-hop chain's steps at the positions the rings timed
    hop_rtts: list[list[float]] = [[] for _ in thirds]
    hop_compute: list[list[float]] = [[] for _ in thirds]
    mismatches = 0
    for rnd in range(rounds + 1):  # round 0 warms both chains up and is not kept
        s1 = await chain(node, one_route, len(prompt) + tokens + 2)
        s3 = await chain(node, three_route, len(prompt) + tokens + 2)
        s3p = await chain(node, three_route, len(prompt) + tokens + 2, push=True)
        s3r = await chain(node, three_route, len(prompt) + tokens + 2, push=True, ring=True)
        s3q = await chain(
            node, three_route, len(prompt) + tokens + 2, push=True, ring=True, quiet=True
        )
        local = local_thirds()
        n = tokens if rnd > 0 else WARMUP_TOKENS
        try:
            token = int(np.argmax(await s1.extend(prompt)))
            mismatches += token != int(np.argmax(await s3.extend(prompt)))
            mismatches += token != int(np.argmax(await s3p.extend(prompt)))
            compute_only(local, np.asarray([prompt], dtype=np.int64), 0)
            # Blocks of RING_BLOCK tokens: the lock-step chains, then each ring, in turns,
            # so drift within a round does not favour either; rings pair with the 1-hop
            # chain by position (the first step of each later ring block is the client's
            # own, not timed, so those positions have no pair).
            lock: dict[str, Any] = {"t1": [], "t3": [], "t3p": [], "hops": [], "compute": []}
            lock_tokens: dict[int, tuple[float, int]] = {}
            ring_at = {s3r: (list(prompt), 0), s3q: (list(prompt), 0)}
            ring_seen: dict[ShardedSession, dict[int, tuple[float, int]]] = {s3r: {}, s3q: {}}
            at = len(prompt)
            for block in range(0, n, RING_BLOCK):
                size = min(RING_BLOCK, n - block)
                rings = [s3r, s3q] if (block // RING_BLOCK + rnd) % 2 else [s3q, s3r]
                part = await in_lock_step((s1, s3, s3p), local, at, token, size)
                for key in lock:
                    lock[key] += part[key]
                mismatches += part["mismatches"]
                for position, t1, produced in zip(
                    part["positions"], part["t1"], part["tokens"], strict=True
                ):
                    lock_tokens[position] = (t1, produced)
                token, at = part["tokens"][-1], at + size
                for session in rings:
                    feed, fed_at = ring_at[session]
                    seen, last = await ring_block(
                        session, feed, fed_at, at - fed_at - len(feed) + 1
                    )
                    ring_seen[session] |= seen
                    ring_at[session] = ([last], at)
            for session in (s3r, s3q):
                for position, (_, produced) in ring_seen[session].items():
                    mismatches += lock_tokens[position][1] != produced
            round_t1, round_t3, round_t3p = lock["t1"], lock["t3"], lock["t3p"]
            round_hops, round_compute = lock["hops"], lock["compute"]
            paired = sorted(set(ring_seen[s3r]) & set(ring_seen[s3q]))
            round_p1 = [lock_tokens[q][0] for q in paired]
            round_t3r = [ring_seen[s3r][q][0] for q in paired]
            round_t3q = [ring_seen[s3q][q][0] for q in paired]
        finally:
            for session in (s1, s3, s3p, s3r, s3q):
                await session.aclose()
        if rnd > 0:
            if s3p.pushed_steps != len(round_t3p):
                raise RuntimeError(f"pushed {s3p.pushed_steps} of {len(round_t3p)} steps")
            for session in (s3r, s3q):
                if session.ring_steps != len(ring_seen[session]):
                    raise RuntimeError(f"{session.ring_steps} tokens came round, not all timed")
            t1s += round_t1
            t3s += round_t3
            t3ps += round_t3p
            t3rs += round_t3r
            t3qs += round_t3q
            t1_ring += round_p1
            for hops, computed in zip(round_hops, round_compute, strict=True):
                for k, (rtt, own) in enumerate(zip(hops, computed, strict=True)):
                    hop_rtts[k].append(rtt)
                    hop_compute[k].append(own)
    added = [(t3 - t1) / 2 for t1, t3 in zip(t1s, t3s, strict=True)]
    added_push = [(t3 - t1) / 2 for t1, t3 in zip(t1s, t3ps, strict=True)]
    added_ring = [(t3 - t1) / 2 for t1, t3 in zip(t1_ring, t3rs, strict=True)]
    added_quiet = [(t3 - t1) / 2 for t1, t3 in zip(t1_ring, t3qs, strict=True)]
    client = [t3 - sum(h) for t3, h in zip(t3s, zip(*hop_rtts, strict=True), strict=True)]
    return {
        "added": added,
        "added_push": added_push,
        "added_ring": added_ring,
        "added_quiet": added_quiet,
        "t3q": t3qs,
        "t1": t1s,
        "t3r": t3rs,
        "t3": t3s,
        "t3p": t3ps,
        "hop_rtts": hop_rtts,
        "hop_compute": hop_compute,
        "client": client,
        "mismatches": mismatches,
    }


# --- report ----------------------------------------------------------------------------


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f}"


def report(
    lvs: dict[str, Any],
    pinned: dict[str, Any] | None,
    conc: dict[str, Any],
    hop: dict[str, Any],
    args: Any,
) -> str:
    ratio = lvs["sharded"] / lvs["local"]
    one_cpu: list[list[object]] = []
    if pinned is not None:
        one_cpu.append(
            [
                "same, the 3 servers sharing one CPU: local / sharded",
                f"{pinned['local']:.1f} / {pinned['sharded']:.1f} tok/s",
                f"{pinned['sharded'] / pinned['local']:.2f}x local; per round, median: "
                f"{pinned['paired']:.2f}x",
            ]
        )
    added, added_push, added_ring = hop["added"], hop["added_push"], hop["added_ring"]
    rows: list[list[object]] = [
        ["local decode (node.complete, 1 thread)", f"{lvs['local']:.1f} tok/s", "baseline"],
        [
            "sharded decode, 3 processes (0-10, 10-20, 20-30)",
            f"{lvs['sharded']:.1f} tok/s",
            f"{ratio:.2f}x local (target >= 0.9x); per round, median: {lvs['paired']:.2f}x",
        ],
        *one_cpu,
        [
            "client process CPU per token: local / sharded, median",
            f"{ms(lvs['cpu_local'])} / {ms(lvs['cpu_client'])} ms",
            "prefill included",
        ],
        [
            "added latency per hop, round a ring (the default for greedy), median / p95",
            f"{ms(statistics.median(added_ring))} / {ms(pct(added_ring, 95))} ms",
            "target <= 1.5 ms",
        ],
        [
            "added latency per hop, round a quiet ring, median / p95",
            f"{ms(statistics.median(hop['added_quiet']))} / {ms(pct(hop['added_quiet'], 95))} ms",
            "",
        ],
        [
            "added latency per hop, pushed (sampling), median / p95",
            f"{ms(statistics.median(added_push))} / {ms(pct(added_push, 95))} ms",
            "",
        ],
        [
            "added latency per hop, relayed by the client, median / p95",
            f"{ms(statistics.median(added))} / {ms(pct(added, 95))} ms",
            "",
        ],
        [
            "per-token step, 1-hop chain (0-30), median",
            f"{ms(statistics.median(hop['t1']))} ms",
            "same compute as 3-hop",
        ],
        [
            "per-token step, 3-hop chain ring / quiet ring / pushed / relayed, median",
            f"{ms(statistics.median(hop['t3r']))} / {ms(statistics.median(hop['t3q']))} / "
            f"{ms(statistics.median(hop['t3p']))} / {ms(statistics.median(hop['t3']))} ms",
            "",
        ],
    ]
    for k, (rtts, own) in enumerate(zip(hop["hop_rtts"], hop["hop_compute"], strict=True)):
        overhead = [r - c for r, c in zip(rtts, own, strict=True)]
        rows.append(
            [
                f"  relayed hop {k} ({THIRDS[k]}): round trip at the client / same blocks "
                "in-process, median",
                f"{ms(statistics.median(rtts))} / {ms(statistics.median(own))} ms",
                f"{ms(statistics.median(overhead))} ms beyond compute",
            ]
        )
    rows += [
        [
            "  client time outside hop round trips, median",
            f"{ms(statistics.median(hop['client']))} ms",
            "history, events, argmax",
        ],
        ["decode, 1 session", f"{conc['one']:.1f} tok/s", "baseline"],
        [
            "decode, 4 concurrent sessions (sum)",
            f"{conc['four']:.1f} tok/s",
            f"{conc['speedup']:.2f}x one session",
        ],
    ]
    hop_p50 = statistics.median(added_ring)
    notes = [
        f"Targets: sharded >= 0.9x local {'met' if ratio >= 0.9 else 'MISSED'} "
        f"({ratio:.2f}x); added latency per hop <= 1.5 ms "
        f"{'met' if hop_p50 <= 0.0015 else 'MISSED'} ({ms(hop_p50)} ms median).",
        f"Greedy, {args.tokens} new tokens, median of {args.rounds} interleaved runs (per "
        "round: the ratio of each round's two adjacent runs, median over rounds; it cancels "
        "this machine's drift between rounds); "
        f"sharded tokens identical to local: {lvs['same_tokens']} "
        f"({lvs['n_tokens']} tokens). Runs: local "
        + ", ".join(f"{r:.1f}" for r in lvs["local_runs"])
        + "; sharded "
        + ", ".join(f"{r:.1f}" for r in lvs["sharded_runs"])
        + " tok/s.",
        *(
            [
                "Servers sharing one CPU: the same measure run again (after the first, same "
                "servers and client) with every thread of the three server processes pinned "
                "to the last CPU and the client left free; runs: local "
                + ", ".join(f"{r:.1f}" for r in pinned["local_runs"])
                + "; sharded "
                + ", ".join(f"{r:.1f}" for r in pinned["sharded_runs"])
                + " tok/s. The servers compute one after another for a single session, so "
                "one CPU is all they use; what pinning removes is the four processes trading "
                "places on the two vCPUs (a wake-up lands on the other, idle vCPU, a process "
                "migrates, the client's bookkeeping shares a core with a server's compute)."
            ]
            if pinned is not None
            else []
        ),
        "Decode tok/s = (tokens - 1) / (time from first to last token), as `node.complete` "
        "reports it. Local runs onnxruntime-genai on the whole model; each shard server runs "
        "plain onnxruntime on its blocks, so the ratio includes that engine difference.",
        f"Added latency per hop: a 1-hop chain (one server with blocks 0-30) and two 3-hop "
        "chains, one pushing server to server and one relayed by the client, decode the same "
        "tokens in lock-step, taking turns to go first; per token (t3 - t1) / 2, the time "
        "each of the two extra servers adds, over "
        f"{len(added)} tokens ({args.rounds} rounds after a "
        f"{WARMUP_TOKENS}-token warm-up). Two more 3-hop chains decode the same tokens round "
        "a ring (full, and quiet: only the last server answers the client) in the same "
        f"round, taking turns with the lock-step chains in blocks of {RING_BLOCK} tokens; "
        "their t3 is the gap between consecutive tokens, paired with the 1-hop chain's step "
        f"at the same position ({len(hop['t3r'])} pairs: a later block's first step is the "
        "client's own and is not timed). "
        "The 1-hop chain keeps the client in its loop (two messages per token: a ring "
        "needs two servers), a ring has three server-to-server messages per token and "
        "the pushed chain four. "
        "The p95 carries scheduling noise from both chains. Token mismatches "
        f"between the chains: {hop['mismatches']}. Relayed hops' round trips are `ShardConnection` "
        "busy time per token (send to reply); the in-process figure is the same shard graph "
        "run in the client process on the same token right after, so round trip minus it is "
        "what a hop costs beyond its compute (framing, sealing, loopback TCP, waking an idle "
        "process; see the transport section for this machine's floor). Servers run with "
        f"`--inline-step-ms {args.inline_step_ms:g}`"
        + (
            ", so every server, the 0-30 one included, runs decode steps on its trio thread. "
            if args.inline_step_ms >= INLINE_STEP_MS
            else ". "
        )
        + "The client's CPU per token covers the whole call "
        "(prefill included): for local that is the model itself.",
        f"Concurrency: decode tok/s summed over 4 sessions decoding {CONCURRENT_TOKENS} "
        "tokens each at once, greedy round a ring, through the same 3 servers (each runs one "
        "step at a time), timed from the first session's first token to the last session's "
        "last (so other sessions' prefills fall inside the window), divided by one session "
        f"alone; median of {args.rounds}.",
        f"One machine, {os.cpu_count()} cores, shared by 3-4 server processes, the client and "
        "whatever else runs: every hop is loopback TCP, and the servers' compute contends for "
        "the same cores, so this measures protocol overhead, not a speed-up from more "
        "computers. With 4 sessions at most as many steps run at once as there are cores.",
    ]
    return table(["measure", "value", "note"], rows) + "\n\n" + "\n".join(f"- {n}" for n in notes)


async def run(args: Any, model_dir: Path, root: Path) -> tuple[str, dict[str, str]]:
    codec = TextCodec(model_dir)
    prompt = codec.prompt_ids(messages=PROMPT, prompt=None)
    servers: list[Server] = []
    try:
        inline = args.inline_step_ms
        servers.append(start_server(model_dir, root, "shard0", THIRDS[0], None, inline))
        boot = servers[0].addr
        for i, layers in enumerate(THIRDS[1:], start=1):
            servers.append(start_server(model_dir, root, f"shard{i}", layers, boot, inline))
        print(f"3 shard servers up: {', '.join(s.layers for s in servers)}", flush=True)
        async with Node(client_config(root, "client-a", servers, model_dir)) as node:
            lvs = await local_vs_sharded(node, args.tokens, args.rounds)
            print(f"local {lvs['local']:.1f} tok/s, sharded {lvs['sharded']:.1f} tok/s", flush=True)
            pinned = await pinned_local_vs_sharded(node, servers, args.tokens, args.rounds)
            if pinned is not None:
                print(
                    f"servers on one CPU: local {pinned['local']:.1f} tok/s, "
                    f"sharded {pinned['sharded']:.1f} tok/s",
                    flush=True,
                )
            conc = await concurrency(node, codec, CONCURRENT_TOKENS, args.rounds)
            print(f"1 session {conc['one']:.1f}, 4 sessions {conc['four']:.1f} tok/s", flush=True)
        whole = start_server(model_dir, root, "whole", f"0-{N_LAYERS}", boot, inline)
        servers.append(whole)
        async with Node(client_config(root, "client-b", servers, model_dir)) as node:
            max_length = len(prompt) + args.tokens + 2
            models = in_process_thirds(root, model_dir)

            def local_thirds() -> list[ShardSession]:
                return [m.new_session(max_length) for m in models]

            hop = await hop_latency(
                node, whole, servers[:3], prompt, args.tokens, args.rounds, local_thirds
            )
    finally:
        stop(servers)
    headline = {
        "sharded_vs_local": f"{lvs['sharded'] / lvs['local']:.2f}",
        "hop_p50_ms": ms(statistics.median(hop["added_ring"])),
        "concurrency4_speedup": f"{conc['speedup']:.2f}",
    }
    if pinned is not None:
        headline["sharded_vs_local_one_cpu"] = f"{pinned['sharded'] / pinned['local']:.2f}"
    return report(lvs, pinned, conc, hop, args), headline


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=48, help="new tokens per run")
    ap.add_argument("--rounds", type=int, default=3, help="timed runs per measure")
    ap.add_argument("--data-dir", type=Path, default=None, help="server dirs (shards are kept)")
    ap.add_argument(
        "--inline-step-ms",
        type=float,
        default=INLINE_STEP_MS,
        help="the servers' --inline-step-ms (0: every step in a worker thread)",
    )
    ap.add_argument("--no-doc", action="store_true", help="do not update docs/benchmarks.md")
    args = ap.parse_args(argv)
    model_dir = models_dir() / REAL_MODEL_NAME
    if not (model_dir / "model.onnx").is_file():
        print(f"missing {model_dir}; run `make model`", file=sys.stderr)
        return 2
    root = args.data_dir or ROOT / ".cache" / "bench-sharded"
    began = time.perf_counter()
    body, headline = trio.run(run, args, model_dir, root)
    print(body)
    print(f"(took {time.perf_counter() - began:.0f} s)")
    if not args.no_doc:
        title = f"## Sharded decode (`benchmarks/sharded.py`): {REAL_MODEL_NAME}, lossless 4-bit"
        write_section("sharded", f"{title}\n\n{machine()}\n\n{body}\n")
    print(" ".join(f"{key}={value}" for key, value in headline.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
