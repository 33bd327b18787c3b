"""Per-token decode latency, client relay vs server-to-server push vs a ring, and the
time to the first token of a 64-token prompt (4 chunks) relayed vs pushed, over modeled
links.

Four real Nodes in one process (``simnet.swarm.Swarm``): three serve thirds of a tiny
random model through ``start_pipeline_server`` (real onnxruntime, real lanes on
127.0.0.1), one is the client. Loopback has no latency worth the name and this
container cannot add any (no netem), so the link is modeled: ``modeled_link_delay``
delivers every pipeline frame ``delay`` after it was sent, in order per stream, without
holding up the sender (a fault injector in the sense of simnet; the protocol code is
untouched). Relaying costs a token
``2 x hops`` link delays, push ``hops + 1`` and a ring (greedy: the last server feeds
the first) ``hops``; the tiny model keeps compute small so the difference shows. A
relayed prompt costs each chunk two link delays per hop, each hop waiting on the client;
a pushed one goes to the first server at once and on from server to server, about
``hops + 1`` delays in all. For each delay, relay, push and ring sessions run in
interleaved rounds (push and ring both push the prompt; the order rotates per round); a
speed-up is the median of the per-round ratios, with its min-max.

    .venv/bin/python -m simnet.push_latency [--tokens 16] [--rounds 3] [--no-doc]
"""

from __future__ import annotations

import argparse
import itertools
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import aclosing, contextmanager
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
from p2pedge.errors import PeerUnavailable  # noqa: E402
from p2pedge.ids import LayerRange  # noqa: E402
from p2pedge.protocols._stream import FramedStream  # noqa: E402
from p2pedge.protocols.pipeline.client import ClientConfig, ShardedSession  # noqa: E402
from p2pedge.protocols.pipeline.serving import (  # noqa: E402
    open_sharded_session,
    start_pipeline_server,
)
from p2pedge.runtime.config import RuntimeConfig  # noqa: E402
from p2pedge.testing.tiny import build_tiny_model  # noqa: E402
from simnet.swarm import Swarm  # noqa: E402

MODEL = "tiny"
THIRDS = [LayerRange(0, 2), LayerRange(2, 4), LayerRange(4, 6)]
PROMPT = [(7 * i + 5) % 250 for i in range(64)]  # 4 chunks of the default 16
DELAYS_MS = (0.0, 5.0, 20.0)
MODES = ("relay", "push", "ring")


@contextmanager
def modeled_link_delay(seconds: list[float], nursery: trio.Nursery) -> Iterator[None]:
    """Every FramedStream frame arrives ``seconds[0]`` after it is sent (a modeled link):
    the sender goes on at once, and each stream's frames are written in order by a task
    of ``nursery`` once their time has come, as latency on a real link behaves."""
    original = FramedStream.send_bytes
    links: dict[int, trio.MemorySendChannel[tuple[float, bytes]]] = {}

    async def deliver(
        stream: FramedStream, frames: trio.MemoryReceiveChannel[tuple[float, bytes]]
    ) -> None:
        async for due, payload in frames:
            await trio.sleep_until(due)
            try:
                await original(stream, payload)
            except PeerUnavailable:
                return  # the stream is gone; so are its later frames, as on a dead link

    async def delayed(self: FramedStream, payload: bytes) -> None:
        if seconds[0] <= 0:
            await original(self, payload)
            return
        link = links.get(id(self))
        if link is None:
            link, frames = trio.open_memory_channel[tuple[float, bytes]](math.inf)
            links[id(self)] = link
            nursery.start_soon(deliver, self, frames)
        link.send_nowait((trio.current_time() + seconds[0], payload))

    FramedStream.send_bytes = delayed  # type: ignore[method-assign]
    try:
        yield
    finally:
        FramedStream.send_bytes = original  # type: ignore[method-assign]


async def per_token(session: ShardedSession, tokens: int) -> tuple[float, float, list[int]]:
    """Seconds to the first token, median seconds per decoded token, and the tokens."""
    began = time.perf_counter()
    out = [int(np.argmax(await session.extend(PROMPT)))]
    first = time.perf_counter() - began
    times = []
    while len(out) < tokens:
        began = time.perf_counter()
        out.append(int(np.argmax(await session.extend([out[-1]]))))
        times.append(time.perf_counter() - began)
    return first, statistics.median(times), out


async def per_ring_token(session: ShardedSession, tokens: int) -> tuple[float, float, list[int]]:
    """Seconds to the first token, median seconds between tokens coming round the ring,
    and the tokens."""
    out: list[int] = []
    began = time.perf_counter()
    arrivals: list[float] = []
    async with aclosing(session.stream(PROMPT, tokens)) as stream:
        async for token in stream:
            arrivals.append(time.perf_counter())
            out.append(token)
    gaps = statistics.median(b - a for a, b in itertools.pairwise(arrivals))
    return arrivals[0] - began, gaps, out


async def run(args: Any) -> dict[float, dict[str, Any]]:
    work = Path(tempfile.mkdtemp(prefix="p2pedge-push-"))
    model_dir = build_tiny_model(work / MODEL, seed=5, n_layers=6)
    delay = [0.0]
    async with trio.open_nursery() as link_tasks:
        with modeled_link_delay(delay, link_tasks):
            results = await _measure(args, work, model_dir, delay)
        link_tasks.cancel_scope.cancel()
    return results


async def _measure(
    args: Any, work: Path, model_dir: Path, delay: list[float]
) -> dict[float, dict[str, Any]]:
    results: dict[float, dict[str, Any]] = {}
    async with Swarm(4, seed=7, measure_compute=False) as swarm:
        client = swarm.nodes[0]
        for i, (node, layers) in enumerate(zip(swarm.nodes[1:], THIRDS, strict=True)):
            await start_pipeline_server(
                node,
                [(MODEL, model_dir, layers)],
                shards_root=work / f"s{i}",
                runtime=RuntimeConfig(intra_op_threads=1),
            )
            await node.announce()
        for ms in DELAYS_MS:
            delay[0] = ms / 1000
            runs: dict[str, list[float]] = {mode: [] for mode in MODES}
            firsts: dict[str, list[float]] = {mode: [] for mode in MODES}
            outputs: dict[str, list[int]] = {}
            for r in range(args.rounds):
                for mode in turns(MODES, r):
                    config = ClientConfig(
                        max_length=128,
                        step_timeout=30,
                        logits_top_k=1,
                        push=mode != "relay",
                        ring=mode == "ring",
                    )
                    async with await open_sharded_session(client, MODEL, config=config) as session:
                        timer = per_ring_token if mode == "ring" else per_token
                        first, seconds, outputs[mode] = await timer(session, args.tokens)
                        paths = {"push": session.pushed_steps, "ring": session.ring_steps}
                        want = {m: args.tokens - 1 if m == mode else 0 for m in paths}
                        chunks = 0 if mode == "relay" else len(PROMPT) // config.chunk
                        if paths != want or session.pushed_chunks != chunks:
                            raise RuntimeError(f"{mode}: steps went {paths}, {chunks}")
                    runs[mode].append(seconds)
                    firsts[mode].append(first)
            results[ms] = {mode: statistics.median(runs[mode]) for mode in MODES}
            results[ms]["first"] = {m: statistics.median(firsts[m]) for m in MODES}
            results[ms]["push_speedup"] = paired_ratio(runs["relay"], runs["push"])
            results[ms]["ring_vs_push"] = paired_ratio(runs["push"], runs["ring"])
            results[ms]["prompt_speedup"] = paired_ratio(firsts["relay"], firsts["push"])
            results[ms]["saved"] = statistics.median(
                a - b for a, b in zip(runs["relay"], runs["push"], strict=True)
            )
            results[ms]["same"] = len({tuple(v) for v in outputs.values()}) == 1
            print(
                f"delay {ms:g} ms: "
                + ", ".join(f"{m} {results[ms][m] * 1000:.2f}" for m in MODES)
                + " ms per token; first token "
                + ", ".join(f"{m} {results[ms]['first'][m] * 1000:.1f}" for m in MODES)
                + " ms",
                flush=True,
            )
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=16, help="tokens decoded per session")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds per delay")
    ap.add_argument("--no-doc", action="store_true", help="do not update docs/benchmarks.md")
    args = ap.parse_args(argv)
    results = trio.run(run, args)
    rows = []
    for ms, r in results.items():
        rows.append(
            [
                f"{ms:g}",
                f"{r['relay'] * 1000:.2f}",
                f"{r['push'] * 1000:.2f}",
                ratio_cell(r["push_speedup"]),
                f"{r['saved'] * 1000:.2f}",
                f"{r['ring'] * 1000:.2f}",
                ratio_cell(r["ring_vs_push"]),
                f"{r['first']['relay'] * 1000:.1f}",
                f"{r['first']['push'] * 1000:.1f}",
                ratio_cell(r["prompt_speedup"]),
                "yes" if r["same"] else "NO",
            ]
        )
    body = table(
        [
            "modeled link delay per frame, ms",
            "relay ms/token",
            "push ms/token",
            "push speed-up (min-max)",
            "saved ms/token (paired median)",
            "ring ms/token",
            "ring vs push (min-max)",
            "first token, prompt relayed, ms",
            "prompt pushed, ms",
            "prompt speed-up (min-max)",
            "same tokens",
        ],
        rows,
    )
    print(body)
    if not args.no_doc:
        write_section(
            "push",
            "## Server-to-server push over modeled links (`simnet/push_latency.py`)\n\n"
            f"{machine()}. Three in-process servers hold thirds of a tiny random model "
            "(real onnxruntime, real lanes on 127.0.0.1), one client; every pipeline frame "
            "arrives the given delay after it was sent, in order per stream, the sender "
            "going on at once (a modeled link: loopback has none and this container cannot "
            "add any; until 2026-12-06 the model held the sender up for the delay instead). "
            "Greedy, median per-token decode time of "
            f"{args.rounds} interleaved sessions per mode, {args.tokens} tokens each (for the "
            "ring: the median gap between tokens). With 3 hops, relaying costs a token 6 "
            "link delays, push 4 and a ring 3, so push should save 2 delays per token and "
            "a ring one more. First token: the median time from the call to the first "
            f"token of a {len(PROMPT)}-token prompt in chunks of {ClientConfig().chunk}, "
            "relayed chunk by chunk through the client, or pushed (sent to the first "
            f"server at once, then server to server). {RATIO_DEFINITION}\n\n" + body,
        )
    top = results[DELAYS_MS[-1]]
    zero = results[DELAYS_MS[0]]
    last = f"{DELAYS_MS[-1]:g}ms"
    fields = {
        **ratio_fields(f"push_speedup_{last}", top["push_speedup"]),
        "push_saved_ms": f"{top['saved'] * 1000:.1f}",
        **ratio_fields("push_vs_relay_0ms", zero["push_speedup"]),
        **ratio_fields(f"ring_vs_push_{last}", top["ring_vs_push"]),
        **ratio_fields(f"prompt_push_speedup_{last}", top["prompt_speedup"]),
    }
    print(headline(fields))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
