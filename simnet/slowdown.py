"""A replica that turns slow mid-session: staying on the route vs moving off it.

Four real Nodes in one process (``simnet.swarm.Swarm``): one serves blocks 0-3 of a tiny
random model, two are replicas for 3-6 (real onnxruntime, real lanes on 127.0.0.1), one is
the client. Each session decodes greedily round a ring; after ``--slow-after`` tokens the
3-6 replica it uses is made slow by ``ModeledSlowMachine`` (every step sleeps
``--slow-ms`` in the server's worker thread first: modeled compute, as simnet allows; the
protocol code is untouched). Sessions with the default ``SlowdownPolicy`` and with
``slowdown=None`` take turns. Reported: ms per token after the fault (the move's replay
included), and how many sessions moved. A round is one session of each mode (the order
alternating); moving's speed-up is the median of the per-round ratios, with its min-max.

    .venv/bin/python -m simnet.slowdown [--sessions 6] [--tokens 40] [--no-doc]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from contextlib import aclosing
from pathlib import Path
from typing import Any

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
from p2pedge.planning.slowdown import SlowdownPolicy  # noqa: E402
from p2pedge.protocols.pipeline.client import ClientConfig  # noqa: E402
from p2pedge.protocols.pipeline.serving import open_sharded_session  # noqa: E402
from p2pedge.testing.tiny import build_tiny_model  # noqa: E402
from simnet.route_learning import MODEL, PROMPT, serve_slowable  # noqa: E402
from simnet.swarm import Swarm  # noqa: E402

RANGES = [LayerRange(0, 3), LayerRange(3, 6), LayerRange(3, 6)]
MODES = ("stay", "move")


async def one_session(
    client: Any, mode: str, delays: dict[str, dict[str, float]], args: Any
) -> tuple[float, int, list[int]]:
    """ms per token after the fault, moves made, tokens."""
    policy = SlowdownPolicy() if mode == "move" else None
    config = ClientConfig(max_length=128, step_timeout=30, logits_top_k=1, slowdown=policy)
    tokens: list[int] = []
    async with await open_sharded_session(client, MODEL, config=config) as session:
        slow = delays[session.route[1].peer_id]
        async with aclosing(session.stream(PROMPT, args.tokens)) as stream:
            async for token in stream:
                tokens.append(token)
                if len(tokens) == args.slow_after:
                    slow["s"] = args.slow_ms / 1000
                    began = time.perf_counter()
        per_token = (time.perf_counter() - began) / (len(tokens) - args.slow_after)
        moves = session.reroutes
    slow["s"] = 0.0
    return per_token * 1000, moves, tokens


async def run(args: Any) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="p2pedge-slowdown-"))
    model_dir = build_tiny_model(work / MODEL, seed=5, n_layers=6)
    ms: dict[str, list[float]] = {m: [] for m in MODES}
    moves: dict[str, int] = dict.fromkeys(MODES, 0)
    outputs: set[tuple[int, ...]] = set()
    async with Swarm(1 + len(RANGES), seed=21, measure_compute=False) as swarm:
        client, *servers = swarm.nodes
        delays = await serve_slowable(servers, RANGES, model_dir, work)
        for n in range(args.sessions):
            for mode in turns(MODES, n):
                per_token, moved, tokens = await one_session(client, mode, delays, args)
                ms[mode].append(per_token)
                moves[mode] += moved
                outputs.add(tuple(tokens))
    return {
        "ms": {m: statistics.median(ms[m]) for m in MODES},
        "speedup": paired_ratio(ms["stay"], ms["move"]),
        "moves": moves,
        "same_tokens": len(outputs) == 1,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sessions", type=int, default=6, help="sessions per mode")
    ap.add_argument("--tokens", type=int, default=40, help="tokens per session")
    ap.add_argument("--slow-after", type=int, default=8, help="tokens before the slowdown")
    ap.add_argument("--slow-ms", type=float, default=50.0, help="modeled slowdown per step")
    ap.add_argument("--no-doc", action="store_true", help="do not update docs/benchmarks.md")
    args = ap.parse_args(argv)
    r = trio.run(run, args)
    rows = [
        [mode, f"{r['ms'][mode]:.2f}", f"{r['moves'][mode]} of {args.sessions}", cell]
        for mode, cell in zip(MODES, ("baseline", ratio_cell(r["speedup"])), strict=True)
    ]
    headers = ["after the (modeled) slowdown", "ms per token, median", "sessions that moved"]
    body = table([*headers, "speed-up vs stay (min-max)"], rows)
    print(body)
    if not args.no_doc:
        write_section(
            "slowdown",
            "## Moving off a replica that slows down mid-session (`simnet/slowdown.py`)\n\n"
            f"{machine()}. Blocks 0-3 of a tiny random model on one server, 3-6 on two "
            "replicas (real Nodes, onnxruntime and lanes in one process). Each session "
            f"decodes {args.tokens} greedy tokens round a ring; after {args.slow_after} the "
            f"3-6 replica it uses is slowed by a modeled {args.slow_ms:g} ms per step. "
            f"{args.sessions} sessions per mode, taking turns; ms per token from the "
            "slowdown to the last token (the move and its replay included), median. "
            "`stay`: `ClientConfig(slowdown=None)`; `move`: the default `SlowdownPolicy` "
            "(each of the last four steps >= 3x the mean of the hop's first four, and "
            ">= 20 ms more). Tokens "
            f"identical everywhere: {'yes' if r['same_tokens'] else 'NO'}. "
            f"{RATIO_DEFINITION}\n\n" + body,
        )
    fields = ratio_fields("move_vs_stay", r["speedup"])
    print(headline(fields | {"moved": f"{r['moves']['move']}/{args.sessions}"}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
