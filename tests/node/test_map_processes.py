"""Federated batches over 2 real `python -m p2pedge.node` processes.

Each process serves a tiny model registered under the catalog's model name; an in-process
client node maps prompts over them (``include_local=False``). Every prompt has its own
length, so each answer's ``prompt_tokens`` (reported by the server that ran it) and its
greedy text tell which prompt it answers: results must match a local run of the same
map item for item. The second test SIGKILLs one process from inside the map, as soon as
the first answers are stored, and still expects every result exactly once.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import trio

from p2pedge.node.config import NodeConfig, Tuning
from p2pedge.node.node import Node
from p2pedge.orchestrator.federated import MapStats
from p2pedge.orchestrator.orchestrator import Answer
from p2pedge.testing import build_tiny_model

pytestmark = pytest.mark.slow
MODEL = "smollm2-135m-instruct"  # the catalog's model; a tiny stand-in here
ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


def prompts(n: int) -> list[str]:
    """Prompts of strictly increasing length, so ``prompt_tokens`` identifies each."""
    return [f"item {i}:" + " word" * i for i in range(n)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("map") / "tiny", seed=5)


class Server:
    def __init__(self, proc: trio.Process, hello: dict[str, object]) -> None:
        self.proc = proc
        self.peer_id = str(hello["peer_id"])
        self.addr = str(hello["addrs"][0])  # type: ignore[index]


async def start_server(tmp: Path, name: str, tiny: Path, bootstrap: str | None) -> Server:
    args = [sys.executable, "-m", "p2pedge.node", "--json", "--threads", "1"]
    args += ["--data-dir", str(tmp / name), "--model", f"{MODEL}={tiny}"]
    if bootstrap is not None:
        args += ["--bootstrap", bootstrap]
    with (tmp / f"{name}.err").open("wb") as err:
        proc = await trio.lowlevel.open_process(args, stdout=subprocess.PIPE, stderr=err, env=ENV)
    assert proc.stdout is not None
    buffer = b""
    hello: dict[str, object] = {}
    with trio.fail_after(60):
        while True:
            chunk = await proc.stdout.receive_some(4096)
            assert chunk, f"{name} exited: {(tmp / f'{name}.err').read_text()}"
            buffer += chunk
            for line in buffer.splitlines(keepends=True):
                if line.endswith(b"\n") and json.loads(line).get("event") == "listening":
                    hello = json.loads(line)
                if line.endswith(b"\n") and json.loads(line).get("event") == "announced":
                    return Server(proc, hello)


@pytest.fixture
async def servers(tmp_path: Path, tiny: Path) -> AsyncIterator[list[Server]]:
    first = await start_server(tmp_path, "a", tiny, None)
    out = [first]
    try:
        out.append(await start_server(tmp_path, "b", tiny, first.addr))
        yield out
    finally:
        for server in out:
            if server.proc.returncode is None:
                server.proc.send_signal(signal.SIGINT)
        with trio.fail_after(20):
            for server in out:
                await server.proc.wait()


async def client(tmp: Path, servers: list[Server]) -> Node:
    return Node(
        NodeConfig(
            data_dir=tmp / "client",
            bootstrap=tuple(s.addr for s in servers),
            tuning=Tuning(measure_compute=False),
        )
    )


async def until_both_found(node: Node, servers: list[Server]) -> None:
    """Each process printed "announced" after its first announce: both are findable now."""
    wanted = {s.peer_id for s in servers}
    assert wanted <= {c.peer_id for c in await node.find_peers(MODEL)}


async def expected(tmp: Path, tiny: Path, items: list[str]) -> list[tuple[str, int]]:
    """The same map run locally: greedy text and prompt length of each item."""
    config = NodeConfig(
        data_dir=tmp / "reference", local_only=True, tuning=Tuning(measure_compute=False),
        model_dirs=((MODEL, tiny),),
    )  # fmt: skip
    async with Node(config) as node:
        answers = await node.map(MODEL, items, max_tokens=4)
    return [(a.text, a.prompt_tokens) for a in answers]


def identify(answers: list[Answer]) -> list[tuple[str, int]]:
    return [(a.text, a.prompt_tokens) for a in answers]


async def test_map_spreads_over_two_processes_in_input_order(
    servers: list[Server], tmp_path: Path, tiny: Path
) -> None:
    items = prompts(8)
    want = await expected(tmp_path, tiny, items)
    assert len({tokens for _, tokens in want}) == len(items)
    stats = MapStats()
    async with await client(tmp_path, servers) as node:
        await until_both_found(node, servers)
        answers = await node.map(MODEL, items, max_tokens=4, include_local=False, stats=stats)
    assert identify(answers) == want
    ran_on = {a.decision.peer_id for a in answers}
    assert ran_on == {s.peer_id for s in servers}
    assert sum(stats.per_peer.values()) == len(items) and stats.retries == 0


class SigkillAfter(dict[str, int]):
    """Fault injector: a ``MapStats.per_peer`` that SIGKILLs ``victim`` once ``after``
    results have been stored, i.e. from inside the running map."""

    def __init__(self, after: int, kill: Callable[[], None]) -> None:
        super().__init__()
        self.after = after
        self.kill = kill
        self.fired = False

    def __setitem__(self, peer: str, count: int) -> None:
        super().__setitem__(peer, count)
        if not self.fired and sum(self.values()) >= self.after:
            self.fired = True
            self.kill()


async def test_map_with_a_process_killed_midway_returns_every_result_once(
    servers: list[Server], tmp_path: Path, tiny: Path
) -> None:
    items = prompts(16)
    want = await expected(tmp_path, tiny, items)
    victim = servers[1]
    per_peer = SigkillAfter(3, lambda: victim.proc.send_signal(signal.SIGKILL))
    stats = MapStats(per_peer=per_peer)
    async with await client(tmp_path, servers) as node:
        await until_both_found(node, servers)
        answers = await node.map(MODEL, items, max_tokens=4, include_local=False, stats=stats)
    assert per_peer.fired
    with trio.fail_after(10):
        assert await victim.proc.wait() == -signal.SIGKILL
    assert identify(answers) == want  # every item, in order, none doubled
    assert sum(per_peer.values()) == len(items)
    assert stats.dead == [victim.peer_id] and stats.retries >= 1
    survivor = servers[0].peer_id
    assert per_peer[survivor] == len(items) - per_peer.get(victim.peer_id, 0)
    assert {a.decision.peer_id for a in answers[-4:]} == {survivor}
