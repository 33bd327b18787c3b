"""`make demo`: the main job on the real model, locally and through a swarm of shards.

1. A node in local mode answers a chat prompt with SmolLM2-135M-Instruct.
2. Three `python -m p2pedge.node --serve` processes each serve a third of the model's
   blocks on 127.0.0.1; a client node finds them through signed cards on the DHT and
   generates the same answer through them. Both paths' tok/s are printed.
3. The orchestrator routes a few requests to specialists and says why.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import trio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from p2pedge import Node, NodeConfig  # noqa: E402
from p2pedge.testing import real_model_dir  # noqa: E402

MODEL = "smollm2-135m-instruct"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
THIRDS = ("0-10", "10-20", "20-30")
THREADS = os.cpu_count() or 1


def start_servers(model_dir: Path, root: Path) -> tuple[list[subprocess.Popen[bytes]], list[str]]:
    procs, addrs = [], []
    for index, layers in enumerate(THIRDS):
        cmd = [sys.executable, "-m", "p2pedge.node", "--json", "--threads", str(THREADS)]
        cmd += ["--data-dir", str(root / f"shard{index}"), "--model", f"{MODEL}={model_dir}"]
        cmd += ["--serve", f"{MODEL}:{layers}", *(["--bootstrap", addrs[0]] if addrs else [])]
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"}
        )
        assert proc.stdout is not None
        for line in proc.stdout:
            event = json.loads(line)
            if event["event"] == "listening":
                addrs.append(event["addrs"][0])
                print(f"  shard server {index}: blocks {layers} at {event['addrs'][0]}")
                break
        procs.append(proc)
    return procs, addrs


async def main() -> None:
    model_dir = real_model_dir()
    root = Path(tempfile.mkdtemp(prefix="p2pedge-demo-"))
    print(f"== 1. local mode: {MODEL} ({model_dir.name})")
    config = NodeConfig(data_dir=root / "local", local_only=True, model_dirs=((MODEL, model_dir),))
    async with Node(config) as node:
        local = await node.complete(MODEL, messages=QUESTION, max_tokens=32, temperature=0)
        print(f"  answer: {local.text.strip()!r}")
        print(f"  {local.tok_per_s:.1f} tok/s, first token after {local.ttft_s * 1000:.0f} ms")

    print(f"== 2. sharded: three processes serve a third of the blocks each ({THREADS} threads)")
    procs, addrs = start_servers(model_dir, root)
    try:
        client = NodeConfig(
            data_dir=root / "client", bootstrap=tuple(addrs), model_dirs=((MODEL, model_dir),)
        )
        async with Node(client) as node:
            peers = await node.find_peers()
            print(f"  client sees {len(peers) - 1} verified peer cards")
            sharded = await node.complete(MODEL, messages=QUESTION, max_tokens=32, route="sharded")
            print(f"  answer: {sharded.text.strip()!r}")
            ttft_ms = sharded.ttft_s * 1000
            print(f"  {sharded.tok_per_s:.1f} tok/s over 3 hops, first token in {ttft_ms:.0f} ms")
            print("  (greedy: each token goes round a ring, the last server feeding the first)")
            same = list(sharded.token_ids) == list(local.token_ids)
            print(f"  identical tokens to the local run: {same}")

            print("== 3. orchestrator: routing to specialists")
            for text in (
                "Translate 'thank you' into Spanish.",
                "Summarize: the meeting moved to Friday.",
            ):
                answer = await node.ask(text, max_tokens=24)
                decision = answer.decision
                print(f"  {text!r} -> {decision.category} ({decision.where})")
                print(f"    answer: {answer.text.strip()!r}")
                print(f"    why: {answer.decision.reason}")
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGINT)
        for proc in procs:
            proc.wait(timeout=30)
    print(f"local_tok_s={local.tok_per_s:.1f} sharded_tok_s={sharded.tok_per_s:.1f}")


if __name__ == "__main__":
    trio.run(main)
