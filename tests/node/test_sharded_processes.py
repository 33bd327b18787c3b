"""SmolLM2 split in thirds across real `python -m p2pedge.node --serve` processes.

Five server processes (two spares) and an in-process client node: sharded greedy tokens
(round the ring: the last server feeds each token to the first) equal local ones on five
prompts; a SIGKILLed server and a SIGSTOPped one are replaced mid-generation with
identical tokens.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import aclosing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from p2pedge.node.config import NodeConfig, Tuning
from p2pedge.node.node import Node
from p2pedge.testing import real_model_dir

pytestmark = [pytest.mark.real_model, pytest.mark.slow]
MODEL = "smollm2"
# The default import (8-bit activations): one batch and stepwise steps differ by up to ~1.4
# in a logit there, so these tests hold only because a recovery replays the prefix with the
# replaced hop's own step boundaries (France, position 9, where the top two are 0.07 apart,
# changed when the replay went in chunk-sized batches).
VARIANT = "lossless4"
RANGES = ["0-10", "10-20", "20-30", "10-20", "20-30"]
PROMPTS = [
    "What is the capital of France?",
    "Name three primary colours.",
    "Write a haiku about the sea.",
    "What is 12 plus 30?",
    "Why is the sky blue?",
]
STEP_TIMEOUT = 4.0


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    peer_id: str
    addr: str
    layers: str


def _start(
    model_dir: Path, root: Path, index: int, layers: str, bootstrap: str | None
) -> subprocess.Popen[bytes]:
    args = [
        sys.executable,
        "-m",
        "p2pedge.node",
        "--json",
        "--threads",
        "1",
        "--data-dir",
        str(root / f"server{index}"),
        "--model",
        f"{MODEL}={model_dir}",
        "--serve",
        f"{MODEL}:{layers}",
    ]
    if bootstrap:
        args += ["--bootstrap", bootstrap]
    return subprocess.Popen(
        args,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def _listening(proc: subprocess.Popen[bytes]) -> dict[str, object]:
    assert proc.stdout is not None
    for line in proc.stdout:
        event = json.loads(line)
        if event["event"] == "listening":
            return event
    raise AssertionError(f"server exited: {proc.stderr.read().decode() if proc.stderr else ''}")


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Server]]:
    model_dir = real_model_dir(VARIANT)
    root = tmp_path_factory.mktemp("shards")
    first = _start(model_dir, root, 0, RANGES[0], None)
    hello = _listening(first)
    boot = str(hello["addrs"][0])  # type: ignore[index]
    procs = [first] + [
        _start(model_dir, root, i, r, boot) for i, r in enumerate(RANGES[1:], start=1)
    ]
    found = [hello] + [_listening(p) for p in procs[1:]]
    out = [
        Server(p, str(h["peer_id"]), str(h["addrs"][0]), r)
        for p, h, r in zip(procs, found, RANGES, strict=True)
    ]  # type: ignore[index]
    yield out
    for server in out:
        if server.proc.poll() is None:
            server.proc.send_signal(signal.SIGCONT)
            server.proc.send_signal(signal.SIGINT)
    for server in out:
        server.proc.wait(timeout=30)


async def _client(
    servers: list[Server], tmp: Path, *, shard_push: bool = True, **overrides: Any
) -> Node:
    config = NodeConfig(
        data_dir=tmp / "client",
        bootstrap=tuple(s.addr for s in servers),
        model_dirs=((MODEL, real_model_dir(VARIANT)),),
        tuning=Tuning(
            shard_step_timeout=STEP_TIMEOUT, measure_compute=False, shard_push=shard_push,
            **overrides,
        ),
    )  # fmt: skip
    return Node(config)


async def _tokens(node: Node, prompt: str, route: str, n: int = 12) -> list[int]:
    completion = await node.complete(
        MODEL, messages=[{"role": "user", "content": prompt}], max_tokens=n, route=route
    )
    return list(completion.token_ids)


async def test_sharded_greedy_tokens_equal_local_on_five_prompts(
    servers: list[Server], tmp_path: Path
) -> None:
    async with await _client(servers, tmp_path) as node:
        for prompt in PROMPTS:
            local = await _tokens(node, prompt, "local")
            sharded = await _tokens(node, prompt, "sharded")
            assert sharded == local, prompt
            assert len(local) > 3


async def test_shard_push_off_relays_every_step(servers: list[Server], tmp_path: Path) -> None:
    async with await _client(servers, tmp_path, shard_push=False) as node:
        info: dict[str, object] = {}
        stream = node.models.sharded_stream(
            MODEL, messages=[{"role": "user", "content": PROMPTS[1]}], max_tokens=6, info=info
        )
        async with aclosing(stream) as pairs:
            tokens = [token async for _piece, token in pairs]
        session: Any = info["session"]
        assert len(tokens) > 3 and session.pushed_steps == 0 and not session.push_ok
        assert session.ring_steps == 0  # a ring needs push too
        assert tokens == await _tokens(node, PROMPTS[1], "local", n=len(tokens))


async def test_sampled_tokens_round_the_ring_equal_relayed_ones(
    servers: list[Server], tmp_path: Path
) -> None:
    sampling: dict[str, Any] = {"max_tokens": 10, "temperature": 0.9, "top_p": 0.95, "seed": 5}
    messages = [{"role": "user", "content": PROMPTS[2]}]
    runs: list[list[int]] = []
    for name, push in (("ring", True), ("relay", False)):
        async with await _client(servers, tmp_path / name, shard_push=push) as node:
            info: dict[str, object] = {}
            stream = node.models.sharded_stream(MODEL, messages=messages, info=info, **sampling)
            async with aclosing(stream) as pairs:
                runs.append([token async for _piece, token in pairs])
            session: Any = info["session"]
            assert (session.ring_steps > 0) == push
    assert runs[0] == runs[1] and len(runs[0]) > 3


async def _generate_with_fault(
    node: Node, prompt: str, hop: int, fault: signal.Signals, servers: list[Server]
) -> tuple[list[int], Server, float]:
    info: dict[str, object] = {}
    tokens: list[int] = []
    victim: Server | None = None
    gap = 0.0
    last = time.perf_counter()
    stream = node.models.sharded_stream(
        MODEL, messages=[{"role": "user", "content": prompt}], max_tokens=12, info=info
    )
    async with aclosing(stream) as pairs:
        async for _piece, token in pairs:
            now = time.perf_counter()
            gap = max(gap, now - last) if victim is not None else gap
            last = now
            tokens.append(token)
            if len(tokens) == 4:
                session = info["session"]
                assert session.ring_steps == 3  # type: ignore[attr-defined]  # decode steps
                peer = session.route[hop].peer_id  # type: ignore[attr-defined]
                victim = next(s for s in servers if s.peer_id == peer)
                victim.proc.send_signal(fault)
                last = time.perf_counter()
        assert session.recoveries >= 1  # type: ignore[attr-defined]
        assert victim.peer_id in session.banned()  # type: ignore[attr-defined]
    assert victim is not None
    return tokens, victim, gap


async def test_frozen_server_is_replaced_within_the_step_timeout(
    servers: list[Server], tmp_path: Path
) -> None:
    # unverified, so tokens stream one by one and the fault lands mid-ring (verified
    # sessions deliver after each check: tests/node/test_verified.py covers their replays)
    async with await _client(servers, tmp_path, shard_verify=None) as node:
        expected = await _tokens(node, PROMPTS[0], "local")
        tokens, victim, gap = await _generate_with_fault(
            node, PROMPTS[0], 2, signal.SIGSTOP, servers
        )
        victim.proc.send_signal(signal.SIGCONT)
    assert tokens == expected
    assert gap < STEP_TIMEOUT + 6.0


async def test_killed_server_is_replaced_mid_generation(
    servers: list[Server], tmp_path: Path
) -> None:
    async with await _client(servers, tmp_path, shard_verify=None) as node:
        expected = await _tokens(node, PROMPTS[1], "local")
        tokens, victim, _ = await _generate_with_fault(node, PROMPTS[1], 1, signal.SIGKILL, servers)
    assert tokens == expected
    assert victim.proc.wait(timeout=10) == -signal.SIGKILL
