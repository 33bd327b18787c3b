"""The OpenAI-compatible API against ``node.generate``, same node, same run.

One process runs a local-mode node (the real SmolLM2 when imported, else a tiny random
Llama) with its API on loopback, and times ``node.generate`` itself; the ``openai`` client
runs in one long-lived child process (``--client``, driven by one JSON line per request),
so its parsing does not share the server's thread and no round pays for starting it.

- **Decode:** per round, in alternating order, both sides stream the same greedy chat
  answer to the story prompt; decode tok/s is (pieces - 1) / (last piece - first piece)
  on both sides. ``api_vs_generate`` is the median of the paired per-round ratios.
- **Time to first token:** what the API adds is prompt-independent (request parsing,
  routing, SSE framing, the round trip, the client's own handling), but the story
  prompt's prefill varies by about +-10% from one request to the next on a small VM,
  which is more than the API's share. So ``ttft_added_ms`` comes from separate rounds of
  text completions of a one-word prompt (prefill about one decode step), the median of
  paired differences; the story rounds' paired median is printed beside it
  (``ttft_added_chat_ms``), labelled as such.
- **Concurrency:** 16 clients stream at once: aggregate tok/s, fairness (the slowest
  stream's decode tok/s over the fastest's) and errors. The node runs up to
  ``RuntimeConfig.max_active_per_model`` generations of a model at once, taking turns
  token by token, and queues ``queue_limit`` more; a request past that waits in the API
  for a slot (up to ``ApiLimits.queue_wait_s``), then gets 503 + Retry-After, which the
  client retries.

    .venv/bin/python benchmarks/api.py [--tokens 64] [--rounds 15] [--ttft-rounds 41]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
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
SHORT = "Once"  # the TTFT rounds' text-completion prompt
MAX_LINE = 1 << 20


def timing(start: float, stamps: list[float]) -> dict[str, float]:
    if not stamps:
        return {"ttft_s": float("nan"), "tok_s": 0.0, "pieces": 0}
    decode = stamps[-1] - stamps[0]
    rate = (len(stamps) - 1) / decode if len(stamps) > 1 and decode > 0 else 0.0
    return {"ttft_s": stamps[0] - start, "tok_s": rate, "pieces": len(stamps)}


# -- the client process ----------------------------------------------------------------


async def _client_stream(client: Any, model: str, tokens: int, short: bool) -> dict[str, float]:
    start = time.perf_counter()
    stamps: list[float] = []
    if short:
        stream = await client.completions.create(
            model=model, prompt=SHORT, max_tokens=tokens, stream=True
        )
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].text:
                stamps.append(time.perf_counter())
        return timing(start, stamps)
    stream = await client.chat.completions.create(
        model=model, messages=MESSAGES, max_tokens=tokens, stream=True
    )
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            stamps.append(time.perf_counter())
    return timing(start, stamps)


async def _client(url: str, model: str) -> None:
    """One request (or one burst of ``streams`` at once) per command line on stdin."""
    import openai

    client = openai.AsyncOpenAI(base_url=url, api_key="unused", max_retries=5, timeout=300)
    loop = asyncio.get_running_loop()
    while line := await loop.run_in_executor(None, sys.stdin.readline):
        ask = json.loads(line)
        start = time.perf_counter()
        results = await asyncio.gather(
            *(
                _client_stream(client, model, ask["tokens"], ask["short"])
                for _ in range(ask["streams"])
            ),
            return_exceptions=True,
        )
        out = {
            "wall_s": time.perf_counter() - start,
            "streams": [r for r in results if isinstance(r, dict)],
            "errors": [repr(r) for r in results if not isinstance(r, dict)],
        }
        print(json.dumps(out), flush=True)


# -- the server process ----------------------------------------------------------------


class Client:
    """The child process running the ``openai`` client, one JSON line each way."""

    def __init__(self, process: trio.Process) -> None:
        self.process = process
        self.buffer = b""

    async def ask(self, tokens: int, *, streams: int = 1, short: bool = False) -> dict[str, Any]:
        assert self.process.stdin is not None and self.process.stdout is not None
        line = {"tokens": tokens, "streams": streams, "short": short}
        await self.process.stdin.send_all((json.dumps(line) + "\n").encode())
        while b"\n" not in self.buffer:
            chunk = await self.process.stdout.receive_some(65536)
            if not chunk or len(self.buffer) > MAX_LINE:
                raise RuntimeError("the client process ended or wrote too much")
            self.buffer += chunk
        reply, self.buffer = self.buffer.split(b"\n", 1)
        result: dict[str, Any] = json.loads(reply)
        return result


async def _generate(node: Any, model: str, tokens: int, short: bool = False) -> dict[str, float]:
    start = time.perf_counter()
    stamps: list[float] = []
    prompt = {"prompt": SHORT} if short else {"messages": MESSAGES}
    async with aclosing(node.generate(model, max_tokens=tokens, **prompt)) as pieces:
        async for piece in pieces:
            if piece:
                stamps.append(time.perf_counter())
    return timing(start, stamps)


async def _rounds(
    node: Any, client: Client, name: str, rounds: int, tokens: int, short: bool
) -> dict[str, list[dict[str, float]]]:
    sides: dict[str, list[dict[str, float]]] = {"generate": [], "api": []}
    for i in range(rounds):
        for side in turns(list(sides), i):
            if side == "generate":
                sides[side].append(await _generate(node, name, tokens, short))
            else:
                sides[side].append((await client.ask(tokens, short=short))["streams"][0])
    return sides


def _added_ms(sides: dict[str, list[dict[str, float]]]) -> float:
    pairs = zip(sides["api"], sides["generate"], strict=True)
    return statistics.median(1000 * (a["ttft_s"] - g["ttft_s"]) for a, g in pairs)


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
            command = [sys.executable, __file__, "--client", f"http://127.0.0.1:{port}/v1"]
            process = await nursery.start(
                lambda task_status: trio.run_process(
                    [*command, "--model", name], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                    check=False, task_status=task_status,
                )
            )  # fmt: skip
            client = Client(process)
            await _generate(node, name, 4)  # warm the model
            await client.ask(4)  # and the client's lazy set-up and its connection
            await client.ask(4, short=True)
            story = await _rounds(node, client, name, args.rounds, args.tokens, short=False)
            short = await _rounds(node, client, name, args.ttft_rounds, 2, short=True)
            many = await client.ask(args.tokens, streams=args.streams)
            active = node.models.inference.config.max_active_per_model
            assert process.stdin is not None
            await process.stdin.aclose()  # the client's end of input: it exits
            await process.wait()
            nursery.cancel_scope.cancel()
    gen, api = story["generate"], story["api"]
    ratio = paired_ratio([a["tok_s"] for a in api], [g["tok_s"] for g in gen])
    rates = [s["tok_s"] for s in many["streams"]]
    total = sum(s["pieces"] for s in many["streams"])
    fairness = min(rates) / max(rates) if rates and max(rates) > 0 else 0.0

    def ttft(rows: list[dict[str, float]]) -> str:
        return f"{1000 * statistics.median(r['ttft_s'] for r in rows):.1f}"

    print(
        f"{machine()}; model {model_dir.name}, {args.tokens} tokens, {args.rounds} story "
        f"rounds, {args.ttft_rounds} TTFT rounds"
    )
    rows = [
        ["node.generate, story", f"{statistics.median(g['tok_s'] for g in gen):.1f}", ttft(gen)],
        ["API + openai client, story", f"{statistics.median(a['tok_s'] for a in api):.1f}",
         ttft(api)],
        [f"node.generate, completion of {SHORT!r}", "", ttft(short["generate"])],
        [f"API + openai client, completion of {SHORT!r}", "", ttft(short["api"])],
    ]  # fmt: skip
    print(table(["path", "decode tok/s (median)", "TTFT ms (median)"], rows))
    print(
        f"TTFT the API adds (median of paired differences): {_added_ms(short):.2f} ms on "
        f"{SHORT!r}, {_added_ms(story):.2f} ms on the story prompt (its prefill's noise "
        f"is larger than the difference)"
    )
    print(
        f"{args.streams} streams (max_active_per_model={active}): "
        f"{total / many['wall_s']:.1f} tok/s aggregate, "
        f"per-stream {min(rates, default=0):.1f}-{max(rates, default=0):.1f} tok/s, "
        f"{len(many['errors'])} errors {many['errors'][:2]}"
    )
    return {
        **ratio_fields("api_vs_generate", ratio),
        "ttft_added_ms": f"{_added_ms(short):.2f}",
        "ttft_added_chat_ms": f"{_added_ms(story):.2f}",
        f"streams{args.streams}_tok_s": f"{total / many['wall_s']:.1f}",
        f"streams{args.streams}_fairness": f"{fairness:.2f}",
        "errors": str(len(many["errors"])),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--ttft-rounds", type=int, default=41)
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--model-dir")
    parser.add_argument("--client", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client:
        asyncio.run(_client(args.client, args.model))
        return
    print(headline(trio.run(bench, args)))


if __name__ == "__main__":
    main()
