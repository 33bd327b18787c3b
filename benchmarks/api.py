"""The OpenAI-compatible API against ``node.generate``, same node, same run.

One process runs a local-mode node (the real SmolLM2 when imported, else a tiny random
Llama) with its API on loopback, and times ``node.generate`` itself; the ``openai`` client
runs in a child process (``--client``), so its parsing does not share the server's
thread. Per round, in alternating order, both sides stream the same greedy answer;
decode tok/s is (pieces - 1) / (last piece - first piece) on both sides, time to first
piece from the call. Then 16 clients stream at once: aggregate tok/s, fairness (the
slowest stream's decode tok/s over the fastest's) and errors. The node runs up to
``RuntimeConfig.max_active_per_model`` generations of a model at once, taking turns token
by token, and queues ``queue_limit`` more; a request past that waits in the API for a
slot (up to ``ApiLimits.queue_wait_s``), then gets 503 + Retry-After, which the client
retries. With one generation at a time the streams run one after another, and fairness
only measures how the machine's speed drifted between them.

    .venv/bin/python benchmarks/api.py [--tokens 64] [--rounds 7] [--streams 16]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from contextlib import aclosing
from pathlib import Path
from typing import Any

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._report import headline, machine, paired_ratio, ratio_fields, table, turns

ROOT = Path(__file__).resolve().parent.parent
REAL = ROOT / ".cache" / "models" / "smollm2-135m-instruct"
MESSAGES = [{"role": "user", "content": "Write a long story about a dragon who learns to bake."}]


def timing(start: float, stamps: list[float]) -> dict[str, float]:
    if not stamps:
        return {"ttft_s": float("nan"), "tok_s": 0.0, "pieces": 0}
    decode = stamps[-1] - stamps[0]
    rate = (len(stamps) - 1) / decode if len(stamps) > 1 and decode > 0 else 0.0
    return {"ttft_s": stamps[0] - start, "tok_s": rate, "pieces": len(stamps)}


# -- the client process ----------------------------------------------------------------


async def _client_stream(client: Any, model: str, tokens: int) -> dict[str, float]:
    start = time.perf_counter()
    stamps: list[float] = []
    stream = await client.chat.completions.create(
        model=model, messages=MESSAGES, max_tokens=tokens, stream=True
    )
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            stamps.append(time.perf_counter())
    return timing(start, stamps)


async def _client(url: str, model: str, tokens: int, streams: int) -> None:
    import openai

    client = openai.AsyncOpenAI(base_url=url, api_key="unused", max_retries=5, timeout=300)
    await _client_stream(client, model, 1)  # the client's lazy set-up and its connection
    start = time.perf_counter()
    results = await asyncio.gather(
        *(_client_stream(client, model, tokens) for _ in range(streams)), return_exceptions=True
    )
    out = {
        "wall_s": time.perf_counter() - start,
        "streams": [r for r in results if isinstance(r, dict)],
        "errors": [repr(r) for r in results if not isinstance(r, dict)],
    }
    print(json.dumps(out))


# -- the server process ----------------------------------------------------------------


async def _run_client(url: str, model: str, tokens: int, streams: int) -> dict[str, Any]:
    args = [sys.executable, __file__, "--client", url, "--model", model]
    args += ["--tokens", str(tokens), "--streams", str(streams)]
    done = await trio.run_process(args, capture_stdout=True)
    result: dict[str, Any] = json.loads(done.stdout.decode().strip().splitlines()[-1])
    return result


async def _generate(node: Any, model: str, tokens: int) -> dict[str, float]:
    start = time.perf_counter()
    stamps: list[float] = []
    async with aclosing(node.generate(model, messages=MESSAGES, max_tokens=tokens)) as pieces:
        async for _ in pieces:
            stamps.append(time.perf_counter())
    return timing(start, stamps)


async def bench(args: argparse.Namespace) -> dict[str, str]:
    from p2pedge.api import ApiApp, serve_api
    from p2pedge.node.api import api_for
    from p2pedge.node.config import NodeConfig, Tuning
    from p2pedge.node.node import Node

    model_dir = Path(args.model_dir) if args.model_dir else REAL
    with tempfile.TemporaryDirectory() as tmp:
        if not (model_dir / "model.onnx").is_file():
            from p2pedge.testing import build_tiny_model

            model_dir = build_tiny_model(Path(tmp) / "tiny", seed=1)
        name = "bench"
        config = NodeConfig(
            data_dir=Path(tmp) / "node", local_only=True, tuning=Tuning(measure_compute=False),
            model_dirs=((name, model_dir),),
        )  # fmt: skip
        async with Node(config) as node, trio.open_nursery() as nursery:
            port = await nursery.start(serve_api, ApiApp(api_for(node)))
            url = f"http://127.0.0.1:{port}/v1"
            await _generate(node, name, 4)  # warm the model
            await _run_client(url, name, 4, 1)  # and the client's imports' disk cache
            sides: dict[str, list[dict[str, float]]] = {"generate": [], "api": []}
            for i in range(args.rounds):
                for side in turns(list(sides), i):
                    if side == "generate":
                        sides[side].append(await _generate(node, name, args.tokens))
                    else:
                        run = await _run_client(url, name, args.tokens, 1)
                        sides[side].append(run["streams"][0])
            many = await _run_client(url, name, args.tokens, args.streams)
            active = node.models.inference.config.max_active_per_model
            nursery.cancel_scope.cancel()
    gen, api = sides["generate"], sides["api"]
    ratio = paired_ratio([a["tok_s"] for a in api], [g["tok_s"] for g in gen])
    added = [1000 * (a["ttft_s"] - g["ttft_s"]) for a, g in zip(api, gen, strict=True)]
    rates = [s["tok_s"] for s in many["streams"]]
    total = sum(s["pieces"] for s in many["streams"])
    fairness = min(rates) / max(rates) if rates and max(rates) > 0 else 0.0
    print(f"{machine()}; model {model_dir.name}, {args.tokens} tokens, {args.rounds} rounds")
    rows = [
        ["node.generate", f"{statistics.median(g['tok_s'] for g in gen):.1f}",
         f"{1000 * statistics.median(g['ttft_s'] for g in gen):.1f}"],
        ["API + openai client", f"{statistics.median(a['tok_s'] for a in api):.1f}",
         f"{1000 * statistics.median(a['ttft_s'] for a in api):.1f}"],
    ]  # fmt: skip
    print(table(["path", "decode tok/s (median)", "TTFT ms (median)"], rows))
    print(
        f"{args.streams} streams (max_active_per_model={active}): "
        f"{total / many['wall_s']:.1f} tok/s aggregate, "
        f"per-stream {min(rates, default=0):.1f}-{max(rates, default=0):.1f} tok/s, "
        f"{len(many['errors'])} errors {many['errors'][:2]}"
    )
    return {
        **ratio_fields("api_vs_generate", ratio),
        "ttft_added_ms": f"{statistics.median(added):.2f}",
        f"streams{args.streams}_tok_s": f"{total / many['wall_s']:.1f}",
        f"streams{args.streams}_fairness": f"{fairness:.2f}",
        "errors": str(len(many["errors"])),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--model-dir")
    parser.add_argument("--client", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client:
        asyncio.run(_client(args.client, args.model, args.tokens, args.streams))
        return
    print(headline(trio.run(bench, args)))


if __name__ == "__main__":
    main()
