"""`make demo`: the main job on the real model, locally and through a swarm of shards.

1. A node in local mode answers a chat prompt with SmolLM2-135M-Instruct, then the same
   question once more through its OpenAI-compatible API, with the ``openai`` client.
2. A client node signs and publishes the model; three `python -m p2pedge.node --serve`
   processes that hold no model each fetch only their third's files from it (verified
   against the signature), serve those blocks on 127.0.0.1, and the client finds them
   through signed cards on the DHT and generates the same answer through them. Both
   paths' tok/s are printed.
3. The orchestrator routes a few requests to specialists and says why.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import openai
import trio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from p2pedge import ApiConfig, Node, NodeConfig  # noqa: E402
from p2pedge.ids import ModelId  # noqa: E402
from p2pedge.models.keys import generate_key, public_key_hex  # noqa: E402
from p2pedge.models.store import Store  # noqa: E402
from p2pedge.testing import real_model_dir  # noqa: E402

MODEL = "smollm2-135m-instruct"
MODEL_ID = f"{MODEL}@1"
QUESTION = [{"role": "user", "content": "What is the capital of Japan?"}]
THIRDS = ("0-10", "10-20", "20-30")
THREADS = os.cpu_count() or 1


def start_server(root: Path, index: int, boot: str, trusted: Path) -> subprocess.Popen[bytes]:
    """A shard server that holds no model: it fetches its third from the swarm."""
    cmd = [sys.executable, "-m", "p2pedge.node", "--json", "--threads", str(THREADS)]
    cmd += ["--data-dir", str(root / f"shard{index}"), "--bootstrap", boot]
    cmd += ["--serve", f"{MODEL_ID}:{THIRDS[index]}", "--trust", str(trusted)]
    return subprocess.Popen(
        cmd, stdout=subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"}
    )


def announced(proc: subprocess.Popen[bytes]) -> str:
    """A server's address once its card (with the blocks it serves) is on the DHT."""
    assert proc.stdout is not None
    addr = ""
    for line in proc.stdout:
        event = json.loads(line)
        if event["event"] == "listening":
            addr = str(event["addrs"][0])
        elif event["event"] == "announced":
            return addr
    raise SystemExit("a shard server exited before it was up")


def fetched(root: Path, index: int) -> str:
    """What a shard server pulled, read from its store."""
    store = Store(root / f"shard{index}" / "store")
    manifest = store.get_manifest(ModelId.parse(MODEL_ID))
    held = manifest.select(store.held_paths(manifest.model))
    total = sum(f.size for f in manifest.files)
    return f"{len(held)} files, {sum(f.size for f in held) / 1e6:.1f} of {total / 1e6:.1f} MB"


@contextmanager
def demo_root() -> Iterator[Path]:
    """A scratch directory (stores, shard copies: hundreds of MB) removed on every exit.

    The ``finally`` also runs on errors and on Ctrl-C (``KeyboardInterrupt``), which is
    why this is not a bare ``mkdtemp``.
    """
    root = Path(tempfile.mkdtemp(prefix="p2pedge-demo-"))
    try:
        yield root
    finally:
        shutil.rmtree(root)


def stop_servers(procs: list[subprocess.Popen[bytes]]) -> None:
    """Stop the shard servers before their data dirs are removed; kill any that hang."""
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
    for proc in procs:
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def main() -> None:
    model_dir = real_model_dir()
    with demo_root() as root:
        await run_demo(model_dir, root)


async def run_demo(model_dir: Path, root: Path) -> None:
    """The three parts of the demo, with every file under ``root``."""
    print(f"== 1. local mode: {MODEL} ({model_dir.name})")
    config = NodeConfig(
        data_dir=root / "local",
        local_only=True,
        model_dirs=((MODEL, model_dir),),
        api=ApiConfig("127.0.0.1:0"),  # the OS picks a free port
    )
    async with Node(config) as node:
        local = await node.complete(MODEL, messages=QUESTION, max_tokens=32, temperature=0)
        print(f"  answer: {local.text.strip()!r}")
        print(f"  {local.tok_per_s:.1f} tok/s, first token after {local.ttft_s * 1000:.0f} ms")
        url = f"http://127.0.0.1:{node.api_port}/v1"
        async with openai.AsyncOpenAI(base_url=url, api_key="unused") as api:
            reply = await api.chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": QUESTION[0]["content"]}],
                max_tokens=32,
            )
        print(f"  the same through the OpenAI-compatible API at {url} (openai client):")
        print(f"  answer: {(reply.choices[0].message.content or '').strip()!r}")

    print(f"== 2. sharded: three processes fetch a third of the blocks each ({THREADS} threads)")
    key = generate_key()
    trusted = root / "publisher.pub"
    trusted.write_text(public_key_hex(key))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        client = NodeConfig(
            data_dir=root / "client",
            model_dirs=((MODEL, model_dir),),
            trusted_publishers=(trusted,),
        )
        async with Node(client) as node:
            await node.publish(model_dir, MODEL_ID, key)
            print(f"  this node signed and published {MODEL_ID}; servers fetch from it, verified")
            for index in range(len(THIRDS)):
                procs.append(start_server(root, index, node.addrs[0], trusted))
                addr = await trio.to_thread.run_sync(announced, procs[-1])
                print(f"  shard server {index}: blocks {THIRDS[index]} at {addr}")
                print(f"    fetched only its shard's files: {fetched(root, index)}")
            peers = await node.find_peers()
            print(f"  client sees {len(peers) - 1} verified peer cards")
            for request in ("first", "second"):
                sharded = await node.complete(
                    MODEL, messages=QUESTION, max_tokens=32, route="sharded"
                )
                ttft_ms = sharded.ttft_s * 1000
                print(
                    f"  {request} request: {sharded.tok_per_s:.1f} tok/s over 3 hops, "
                    f"first token in {ttft_ms:.0f} ms"
                )
            print("  (the first one also opens the lanes between client and servers, and")
            print("   between the servers, and loads the tokenizer)")
            print(f"  answer: {sharded.text.strip()!r}")
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
        stop_servers(procs)
    print(f"local_tok_s={local.tok_per_s:.1f} sharded_tok_s={sharded.tok_per_s:.1f}")


if __name__ == "__main__":
    try:
        trio.run(main)
    except KeyboardInterrupt:
        sys.exit(130)
