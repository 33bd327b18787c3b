"""Three `python -m p2pedge.node --serve` processes that hold no model: each fetches only
its third of SmolLM2 from a registry (verified against the publisher's signature), builds
its shard, and together they answer with the tokens the whole model gives locally."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from p2pedge.ids import LayerRange, ModelId
from p2pedge.models.convert.shards import shard_files
from p2pedge.models.keys import generate_key, public_key_hex
from p2pedge.models.store import Store
from p2pedge.node.config import NodeConfig, Tuning
from p2pedge.node.node import Node
from p2pedge.registry.server import serve_registry
from p2pedge.testing import real_model_dir
from p2pedge.testing.tiny import REAL_MODEL_NAME

pytestmark = [pytest.mark.real_model, pytest.mark.slow]
MODEL = ModelId(REAL_MODEL_NAME, "1")
THIRDS = (LayerRange(0, 10), LayerRange(10, 20), LayerRange(20, 30))
# A question llama.cpp answers right on this GGUF (tests/models/fixtures/llamacpp_smollm2.json)
QUESTION = [{"role": "user", "content": "What is the capital of Japan?"}]


def _start(
    root: Path, layers: LayerRange, registry: str, trusted: Path, bootstrap: str | None = None
) -> subprocess.Popen[bytes]:
    args = [
        *(sys.executable, "-m", "p2pedge.node", "--json", "--threads", "1"),
        *("--data-dir", str(root / f"server-{layers}"), "--serve", f"{MODEL}:{layers}"),
        *("--registry", registry, "--trust", str(trusted)),
        *(("--bootstrap", bootstrap) if bootstrap else ()),
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)


def _listening(proc: subprocess.Popen[bytes]) -> str:
    """The first address a server prints once it is up (its shard pulled and loaded)."""
    assert proc.stdout is not None
    for line in proc.stdout:
        event = json.loads(line)
        if event["event"] == "listening":
            return str(event["addrs"][0])
    raise AssertionError(f"server exited: {proc.stderr.read().decode() if proc.stderr else ''}")


async def test_servers_pull_only_their_thirds_and_answer_like_the_whole_model(
    tmp_path: Path,
) -> None:
    key = generate_key()
    trusted = tmp_path / "publisher.pub"
    trusted.write_text(public_key_hex(key))
    published = Store(tmp_path / "registry")
    manifest = published.add_model_dir(real_model_dir(), MODEL.name, MODEL.version, "llm", key)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        async with trio.open_nursery() as nursery:
            port = await nursery.start(serve_registry, tmp_path / "registry")
            registry = f"http://127.0.0.1:{port}"
            procs = [_start(tmp_path, THIRDS[0], registry, trusted)]
            addrs = [await trio.to_thread.run_sync(_listening, procs[0])]
            procs += [_start(tmp_path, t, registry, trusted, addrs[0]) for t in THIRDS[1:]]
            addrs += [await trio.to_thread.run_sync(_listening, p) for p in procs[1:]]
            nursery.cancel_scope.cancel()
        for third in THIRDS:
            held = Store(tmp_path / f"server-{third}" / "store").held_paths(MODEL)
            assert sorted(held) == shard_files(real_model_dir(), third)
            blocks = {int(p.split("block-")[1][:3]) for p in held if "block-" in p}
            assert blocks == set(range(third.start, third.end)), third
            pulled = sum(f.size for f in manifest.select(held))
            # the end thirds also hold the Q8_0 embedding (the tied head's table): 0.51 of
            # the default directory, 0.39 of -exact (whose 4-bit blocks weigh more)
            assert pulled < 0.55 * sum(f.size for f in manifest.files), third
        config = NodeConfig(
            data_dir=tmp_path / "client",
            bootstrap=tuple(addrs),
            model_dirs=((MODEL.name, real_model_dir()),),
            tuning=Tuning(measure_compute=False),
        )
        async with Node(config) as client:
            runs = {
                route: await client.complete(
                    MODEL.name, messages=QUESTION, max_tokens=10, route=route
                )
                for route in ("local", "sharded")
            }
        assert list(runs["sharded"].token_ids) == list(runs["local"].token_ids)
        assert "Tokyo" in runs["sharded"].text
        assert len(runs["sharded"].route) == 3
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        for proc in procs:
            assert proc.wait(timeout=30) == 0
