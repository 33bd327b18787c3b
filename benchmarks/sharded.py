"""Sharded vs local decode of SmolLM2-135M-Instruct (lossless 4-bit), per-hop latency,
and throughput with 1 vs 4 concurrent sessions, all in one run on this machine.

Shard servers are real ``python -m p2pedge.node --serve`` processes on 127.0.0.1 with
``--threads 1`` and ``--inline-step-ms 100`` (``--inline-step-ms`` here changes it); the
client is an in-process :class:`~p2pedge.node.node.Node` with ``threads=1`` too, so local
and sharded decode each get one compute thread per step.

1. ``node.complete`` greedy on one prompt, ``route="local"`` and ``route="sharded"``
   (three servers: blocks 0-10, 10-20, 20-30), and the bare ring (the same three shard
   graphs in three processes passing raw bytes: a floor for any protocol on this
   machine, see ``_bare_ring.py``), interleaved, median decode tok/s of R runs and the
   median of per-round ratios with their min-max; then
   again with the three servers (and the bare ring) pinned to one CPU (Linux), the client
   left free.
2. Concurrency: decode tok/s summed over 4 sessions decoding at once through the same
   three servers, divided by the rate of one session alone in the same round.
3. Added latency per hop: a fourth server holds all 30 blocks. A 1-hop chain (that
   server) and two 3-hop chains (one pushing server to server, one relayed by the
   client) decode the same tokens in lock-step, taking turns to go first; all do the same
   compute, so per token ``(t3 - t1) / 2`` is what each of the two extra servers adds
   (framing, msgpack, loopback TCP, process wake-ups, one more onnxruntime run, the
   client's bookkeeping). A fourth 3-hop chain decodes the same tokens round a ring (the
   default for greedy: the last server feeds each token to the first); a ring runs ahead
   by itself, so the ring takes turns with the lock-step chains in blocks of 8 tokens,
   its per-token time is the gap between tokens, and each pairs with the 1-hop chain's
   step at the same position. The client also runs the three shard graphs itself on the
   same tokens, so each relayed hop's round trip splits into compute and the rest.

Run ``make model`` first, then
``python benchmarks/sharded.py [--tokens N] [--rounds R] [--inline-step-ms MS]``;
server data (and the shard graphs built on first use) stay in ``.cache/bench-sharded``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Sequence
from contextlib import aclosing
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import trio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks._bare_ring import BareRing  # noqa: E402
from benchmarks._report import (  # noqa: E402
    RATIO_DEFINITION,
    Ratio,
    headline,
    machine,
    paired_ratio,
    ratio_cell,
    ratio_fields,
    table,
    turns,
    write_section,
)
from benchmarks._shard_servers import (  # noqa: E402
    INLINE_STEP_MS,
    MODEL,
    N_LAYERS,
    STEP_TIMEOUT,
    THIRDS,
    Server,
    client_config,
    start_server,
    stop,
    third_dirs,
)
from benchmarks._sharded_hops import (  # noqa: E402
    RING_BLOCK,
    WARMUP_TOKENS,
    hop_latency,
    in_process_thirds,
)
from p2pedge.node.node import Node  # noqa: E402
from p2pedge.protocols.pipeline.client import ClientConfig, ShardedSession  # noqa: E402
from p2pedge.protocols.pipeline.serving import open_sharded_session  # noqa: E402
from p2pedge.runtime.shard_session import ShardSession  # noqa: E402
from p2pedge.runtime.text import TextCodec  # noqa: E402
from p2pedge.testing.tiny import REAL_MODEL_NAME, models_dir  # noqa: E402

PROMPT = [{"role": "user", "content": "Write a short story about a robot who learns to paint."}]
CONCURRENT_PROMPTS = [
    "Write a short story about a robot who learns to paint.",
    "Explain how a bicycle works to a ten year old.",
    "Describe a walk through a forest in autumn.",
    "Write a letter to a friend about your new garden.",
]
CONCURRENT_TOKENS = 32


def pct(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


# --- 1. local vs sharded through node.complete ------------------------------------------


async def local_vs_sharded(
    node: Node, tokens: int, rounds: int, bare: BareRing, prompt: list[int]
) -> dict[str, Any]:
    """Local, sharded and the bare ring (the same prompt ids), in rotating order per round."""
    for route in ("local", "sharded"):  # warm-up: load the model, dial the servers
        await node.complete(MODEL, messages=PROMPT, max_tokens=4, route=route)
    await trio.to_thread.run_sync(bare.decode, prompt, 4)
    rates: dict[str, list[float]] = {"local": [], "sharded": [], "bare": []}
    cpu: dict[str, list[float]] = {"local": [], "sharded": []}
    ids: dict[str, list[int]] = {}
    me = psutil.Process()
    for r in range(rounds):
        for route in turns(("local", "sharded", "bare"), r):
            if route == "bare":
                rate, ids["bare"] = await trio.to_thread.run_sync(bare.decode, prompt, tokens)
                rates["bare"].append(rate)
                continue
            before = sum(me.cpu_times()[:2])
            done = await node.complete(MODEL, messages=PROMPT, max_tokens=tokens, route=route)
            cpu[route].append((sum(me.cpu_times()[:2]) - before) / len(done.token_ids))
            rates[route].append(done.tok_per_s)
            ids[route] = list(done.token_ids)

    def paired(a: str, b: str) -> Ratio:
        return paired_ratio(rates[a], rates[b])

    n = len(ids["local"])
    return {
        "local": statistics.median(rates["local"]),
        "sharded": statistics.median(rates["sharded"]),
        "bare": statistics.median(rates["bare"]),
        "paired": paired("sharded", "local"),
        "paired_bare": paired("bare", "local"),
        "paired_sharded_bare": paired("sharded", "bare"),
        "local_runs": rates["local"],
        "sharded_runs": rates["sharded"],
        "bare_runs": rates["bare"],
        "cpu_local": statistics.median(cpu["local"]),
        "cpu_client": statistics.median(cpu["sharded"]),
        "same_tokens": ids["local"] == ids["sharded"] == ids["bare"][:n],
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
    node: Node,
    servers: Sequence[Server],
    tokens: int,
    rounds: int,
    bare: BareRing,
    prompt: list[int],
) -> dict[str, Any] | None:
    """Section 1 again with the three servers (and the bare ring's three processes) sharing
    one CPU, the client keeping the rest: what is left when the co-located processes stop
    trading places on the vCPUs."""
    if not can_pin():
        return None
    every = os.sched_getaffinity(0)
    pids = [s.proc.pid for s in servers] + bare.pids
    pin(pids, {max(every)})
    try:
        return await local_vs_sharded(node, tokens, rounds, bare, prompt)
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
    rates: dict[str, list[float]] = {"1": [], "4": []}
    for r in range(rounds):
        for side in turns(("1", "4"), r):
            width = int(side)
            sessions = [
                await open_sharded_session(node, MODEL, config=config) for _ in range(width)
            ]
            try:
                rates[side].append(await decode_rate(sessions, prompts[:width], tokens))
            finally:
                for session in sessions:
                    await session.aclose()
    one, four = statistics.median(rates["1"]), statistics.median(rates["4"])
    return {"one": one, "four": four, "speedup": paired_ratio(rates["4"], rates["1"])}


# --- 3. added latency per hop: 1-hop vs 3-hop chain in lock-step --------------------------


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
    ratio: Ratio = lvs["paired"]
    one_cpu: list[list[object]] = []
    if pinned is not None:
        one_cpu.append(
            [
                "same, the 3 servers (and the bare ring's 3) sharing one CPU: local / sharded "
                "/ bare ring",
                f"{pinned['local']:.1f} / {pinned['sharded']:.1f} / {pinned['bare']:.1f} tok/s",
                f"sharded {ratio_cell(pinned['paired'])} local; bare ring "
                f"{ratio_cell(pinned['paired_bare'])} local",
            ]
        )
    added, added_push, added_ring = hop["added"], hop["added_push"], hop["added_ring"]
    rows: list[list[object]] = [
        ["local decode (node.complete, 1 thread)", f"{lvs['local']:.1f} tok/s", "baseline"],
        [
            "sharded decode, 3 processes (0-10, 10-20, 20-30; harness: all on this machine, "
            "loopback)",
            f"{lvs['sharded']:.1f} tok/s",
            f"{ratio_cell(ratio)} local (target >= 0.9x)",
        ],
        [
            "bare ring: the same 3 shard graphs in 3 processes, raw bytes over blocking "
            "loopback TCP (a floor for any protocol)",
            f"{lvs['bare']:.1f} tok/s",
            f"{ratio_cell(lvs['paired_bare'])} local; sharded / bare ring: "
            f"{ratio_cell(lvs['paired_sharded_bare'])}",
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
            "per-token step, 3-hop chain ring / pushed / relayed, median",
            f"{ms(statistics.median(hop['t3r']))} / {ms(statistics.median(hop['t3p']))} / "
            f"{ms(statistics.median(hop['t3']))} ms",
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
            f"{ratio_cell(conc['speedup'])} one session",
        ],
    ]
    hop_p50 = statistics.median(added_ring)
    notes = [
        f"Targets: sharded >= 0.9x local {'met' if ratio.median >= 0.9 else 'MISSED'} "
        f"({ratio.median:.2f}x); added latency per hop <= 1.5 ms "
        f"{'met' if hop_p50 <= 0.0015 else 'MISSED'} ({ms(hop_p50)} ms median).",
        f"{RATIO_DEFINITION} "
        f"Greedy, {args.tokens} new tokens, median of {args.rounds} interleaved runs (local, "
        "sharded and bare ring in turn, the order rotating per round); "
        f"sharded and bare-ring tokens identical to local: {lvs['same_tokens']} "
        f"({lvs['n_tokens']} tokens). Runs: local "
        + ", ".join(f"{r:.1f}" for r in lvs["local_runs"])
        + "; sharded "
        + ", ".join(f"{r:.1f}" for r in lvs["sharded_runs"])
        + "; bare ring "
        + ", ".join(f"{r:.1f}" for r in lvs["bare_runs"])
        + " tok/s.",
        "Bare ring (`benchmarks/_bare_ring.py`, a baseline, not a library path): the "
        "servers' own shard graphs, each in a process of its own with one onnxruntime "
        "thread, decoding greedily round a ring with nothing between them but fixed binary "
        "headers and the raw hidden state over blocking loopback sockets: no trio, msgpack, "
        "sealing, validation or session machine. What it loses against local is what three "
        "processes that sleep between their steps lose on this machine, whatever the "
        "protocol; sharded / bare ring is what our protocol stack costs on top.",
        *(
            [
                "Servers sharing one CPU: the same measure run again (after the first, same "
                "servers and client) with every thread of the three server processes and of "
                "the bare ring's three pinned to the last CPU and the client left free; runs: "
                "local "
                + ", ".join(f"{r:.1f}" for r in pinned["local_runs"])
                + "; sharded "
                + ", ".join(f"{r:.1f}" for r in pinned["sharded_runs"])
                + "; bare ring "
                + ", ".join(f"{r:.1f}" for r in pinned["bare_runs"])
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
        f"{WARMUP_TOKENS}-token warm-up). A fourth 3-hop chain decodes the same tokens round "
        "a ring in the same "
        f"round, taking turns with the lock-step chains in blocks of {RING_BLOCK} tokens; "
        "its t3 is the gap between consecutive tokens, paired with the 1-hop chain's step "
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
        f"alone in the same round (1 and 4 taking turns to go first); {args.rounds} rounds.",
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
            bare = BareRing(third_dirs(root, model_dir))
            try:
                lvs = await local_vs_sharded(node, args.tokens, args.rounds, bare, prompt)
                print(
                    f"local {lvs['local']:.1f}, sharded {lvs['sharded']:.1f}, "
                    f"bare ring {lvs['bare']:.1f} tok/s",
                    flush=True,
                )
                pinned = await pinned_local_vs_sharded(
                    node, servers, args.tokens, args.rounds, bare, prompt
                )
            finally:
                bare.close()
            if pinned is not None:
                print(
                    f"servers on one CPU: local {pinned['local']:.1f}, sharded "
                    f"{pinned['sharded']:.1f}, bare ring {pinned['bare']:.1f} tok/s",
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
    fields = {
        **ratio_fields("sharded_vs_local", lvs["paired"]),
        "hop_p50_ms": ms(statistics.median(hop["added_ring"])),
        **ratio_fields("concurrency4_speedup", conc["speedup"]),
        **ratio_fields("bare_vs_local", lvs["paired_bare"]),
        **ratio_fields("sharded_vs_bare", lvs["paired_sharded_bare"]),
    }
    if pinned is not None:
        fields |= ratio_fields("sharded_vs_local_one_cpu", pinned["paired"])
    return report(lvs, pinned, conc, hop, args), fields


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
    body, fields = trio.run(run, args, model_dir, root)
    print(body)
    print(f"(took {time.perf_counter() - began:.0f} s)")
    if not args.no_doc:
        title = f"## Sharded decode (`benchmarks/sharded.py`): {REAL_MODEL_NAME}, lossless 4-bit"
        write_section("sharded", f"{title}\n\n{machine()}\n\n{body}\n")
    print(headline(fields))
    return 0


if __name__ == "__main__":
    sys.exit(main())
