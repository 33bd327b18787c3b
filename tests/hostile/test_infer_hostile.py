"""Hostile callers of ``/p2pedge/infer/1.0.0`` against a real node over loopback.

Each attack shows the three things issue 17 asks for: the caller gets the right typed
error, the node still serves a well-behaved client afterwards, and what the server holds
stays bounded (its queue-slot quota, per peer, per source address and in total). The
model is a real tiny ONNX decoder run by onnxruntime-genai; the only fault injected is a
gate that holds requests before they run, so a flood's queue is observable.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from p2pedge.errors import Busy, PeerUnavailable
from p2pedge.node.config import NodeConfig
from p2pedge.node.node import Node
from p2pedge.orchestrator.remote import LocalBackend, install_infer
from p2pedge.protocols._stream import FramedStream
from p2pedge.protocols.infer import codec
from p2pedge.protocols.infer.codec import (
    PROTOCOL_ID,
    GenParams,
    InferLimits,
    InferRejected,
    InferRequest,
    InferResult,
)
from p2pedge.protocols.infer.handler import InferServer, OnPiece, request_completion
from p2pedge.protocols.infer.machine import (
    Accepted,
    ClientEvent,
    Completed,
    Failed,
    InferClient,
)
from p2pedge.testing import build_tiny_model

Config = Callable[..., NodeConfig]
MODEL = "smollm2-135m-instruct"  # the catalog's name; a tiny stand-in here


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("hostile-infer") / "tiny", seed=17)


def good(max_tokens: int = 2) -> InferRequest:
    return InferRequest(1, MODEL, (("user", "hello"),), None, GenParams(max_tokens=max_tokens))


async def ask(client: Node, server: Node) -> InferResult:
    """A well-behaved request, the way a node's orchestrator sends one."""
    stream = await client.open_stream(server.peer_id, PROTOCOL_ID)
    return await request_completion(stream, good(), timeout_s=30)


async def send_raw(client: Node, server: str, frame: dict[str, Any]) -> list[dict[str, Any]]:
    """Send one frame to peer ``server`` as a hostile peer would; every frame it answers."""
    stream = await client.open_stream(server, PROTOCOL_ID)
    await stream.send(frame)
    answers: list[dict[str, Any]] = []
    with contextlib.suppress(PeerUnavailable):
        while True:
            answers.append(await stream.receive(timeout=30))
    return answers


@contextlib.asynccontextmanager
async def nodes(config: Config, tiny: Path, *names: str) -> AsyncIterator[list[Node]]:
    """A serving node and client nodes connected to it (each its own peer id)."""
    async with contextlib.AsyncExitStack() as stack:
        server = await stack.enter_async_context(
            Node(config("server", model_dirs=((MODEL, tiny),)))
        )
        clients = [
            await stack.enter_async_context(Node(config(name, bootstrap=(server.addrs[0],))))
            for name in names
        ]
        yield [server, *clients]


def hostile_params(**changes: Any) -> dict[str, Any]:
    frame = codec.encode_request(good())
    frame["params"].update(changes)
    return frame


HOSTILE = [
    pytest.param(hostile_params(seed=2**31), "seed", id="seed-2**31"),
    pytest.param(hostile_params(top_k=2**40), "top_k", id="top_k-2**40"),
    pytest.param(hostile_params(top_p=0.0), "top_p", id="top_p-0"),
    pytest.param(hostile_params(temperature=float("nan")), "temperature", id="temperature-nan"),
    pytest.param(hostile_params(temperature=1e9), "temperature", id="temperature-1e9"),
    pytest.param(hostile_params(max_tokens=2**62), "max_tokens", id="max_tokens-2**62"),
    pytest.param(hostile_params(stop=[""]), "stop", id="stop-empty"),
    pytest.param(hostile_params(stop=["x"] * 1000), "stop", id="stop-1000"),
    pytest.param(codec.encode_request(good()) | {"id": -5}, "id", id="id-negative"),
    pytest.param(
        codec.encode_request(good()) | {"messages": [{"role": "root", "content": "x"}]},
        "role",
        id="role-unknown",
    ),
    pytest.param(codec.encode_request(good()) | {"messages": "hi"}, "messages", id="messages-str"),
    pytest.param({"t": "infer", "v": 1, "id": 3, "model": 12}, "model", id="model-int"),
    # over max_request_bytes: refused from its length prefix, before it is read
    pytest.param(hostile_params(stop=["x" * 300_000]), "frame", id="frame-300k"),
]


async def test_every_bad_field_gets_a_typed_error_and_the_node_keeps_serving(
    config: Config, tiny: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The seed and top_k requests of issue 17 killed the node; now every bad field of an
    infer request is a ``bad_request`` (``InferRejected`` for the caller), one log line
    names the peer, and the node answers an honest client right after."""
    async with nodes(config, tiny, "attacker", "honest") as (server, attacker, honest):
        infer = install_infer(server, server.models.inference)
        assert (await ask(honest, server)).completion_tokens >= 1
        caplog.set_level(logging.WARNING, logger="p2pedge.protocols")
        for param in HOSTILE:
            frame, field = param.values
            caplog.clear()
            answers = await send_raw(attacker, server.peer_id, frame)  # type: ignore[arg-type]
            assert [a["t"] for a in answers] == ["error"], param.id
            error = codec.decode_error(answers[0])
            assert isinstance(codec.error_from(error.code, error.message), InferRejected)
            code = "too_large" if field == "frame" else "bad_request"
            assert error.code == code and str(field) in error.message, param.id
            lines = [r.getMessage() for r in caplog.records if r.name.startswith("p2pedge")]
            assert len(lines) == 1 and attacker.peer_id in lines[0], (param.id, lines)
            result = await ask(honest, server)
            assert result.completion_tokens >= 1 and result.finish_reason in ("stop", "length")
            assert infer.admission.admitted == 0  # nothing held for the attacker
        assert infer.served == len(HOSTILE) + 1


class Gate:
    """Holds every request before it runs on the real backend until ``opened`` is set."""

    def __init__(self, inner: LocalBackend) -> None:
        self.inner = inner
        self.opened = trio.Event()

    async def serves(self, model: str) -> bool:
        return await self.inner.serves(model)

    async def run(self, request: InferRequest, on_piece: OnPiece) -> InferResult:
        await self.opened.wait()
        return await self.inner.run(request, on_piece)


def gated(server: Node, limits: InferLimits) -> tuple[InferServer, Gate]:
    gate = Gate(LocalBackend(server.models.inference, "gated"))
    infer = InferServer(gate, limits=limits)
    server.set_stream_handler(PROTOCOL_ID, infer.handle)
    return infer, gate


class Pending:
    """A request whose first answer (``accepted`` or an error) has arrived."""

    def __init__(self, stream: FramedStream, client: InferClient, first: ClientEvent) -> None:
        self.stream, self.client, self.first = stream, client, first

    async def finish(self) -> InferResult:
        """Read an accepted request to its end, as ``request_completion`` does."""
        while True:
            event = self.client.receive(await self.stream.receive(timeout=30), trio.current_time())
            if isinstance(event, Failed):
                raise event.error
            if isinstance(event, Completed):
                return event.result


async def first_answer(client: Node, server: Node) -> Pending:
    stream = await client.open_stream(server.peer_id, PROTOCOL_ID)
    machine = InferClient(good(), timeout_s=30)
    await stream.send(machine.start(trio.current_time()))
    event = machine.receive(await stream.receive(timeout=30), trio.current_time())
    return Pending(stream, machine, event)


def busy_scope(pending: Pending) -> str | None:
    first = pending.first
    if isinstance(first, Failed) and isinstance(first.error, Busy):
        assert first.error.limit == "infer.queue_slots"
        return first.error.scope
    assert isinstance(first, Accepted)
    return None


async def flood(client: Node, server: Node, n: int) -> list[Pending]:
    out: list[Pending] = []

    async def one() -> None:
        out.append(await first_answer(client, server))

    async with trio.open_nursery() as nursery:
        for _ in range(n):
            nursery.start_soon(one)
    return out


async def test_a_flood_from_one_peer_fills_only_its_share(config: Config, tiny: Path) -> None:
    limits = InferLimits(max_active=1, slots_per_peer=2, slots_per_source=4, slots_total=6)
    async with nodes(config, tiny, "flooder", "honest") as (server, flooder, honest):
        infer, gate = gated(server, limits)
        flooded = await flood(flooder, server, 12)
        scopes = sorted(str(busy_scope(p)) for p in flooded)
        assert scopes == ["None"] * 2 + ["peer"] * 10
        assert infer.admission.quota.held(peer=flooder.peer_id) == 2 == infer.admission.admitted
        served = await first_answer(honest, server)  # same address, its own peer share
        assert busy_scope(served) is None
        gate.opened.set()
        assert (await served.finish()).completion_tokens >= 1
        for pending in flooded:
            if busy_scope(pending) is None:
                assert (await pending.finish()).completion_tokens >= 1
        assert infer.admission.admitted == 0 and infer.served == 3


@contextlib.contextmanager
def dialing_from(monkeypatch: pytest.MonkeyPatch, address: str) -> Iterator[None]:
    """Outgoing TCP connections leave from ``address`` (any of 127.0.0.0/8) meanwhile."""
    with monkeypatch.context() as patch:
        patch.setattr(
            trio, "open_tcp_stream", functools.partial(trio.open_tcp_stream, local_address=address)
        )
        yield


async def test_new_peer_ids_from_one_address_share_its_quota(
    config: Config, tiny: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three peer ids on 127.0.0.1 together get the source share (4), not 3 x 2; a peer
    on another address (127.0.0.2) is still served, and so is everyone once it drains."""
    limits = InferLimits(max_active=1, slots_per_peer=2, slots_per_source=4, slots_total=8)
    async with nodes(config, tiny, "sybil-1", "sybil-2", "sybil-3") as (server, *sybils):
        async with Node(config("elsewhere")) as elsewhere:
            with dialing_from(monkeypatch, "127.0.0.2"):
                await elsewhere.connect(server.addrs[0])
            infer, gate = gated(server, limits)
            answers = [p for sybil in sybils for p in await flood(sybil, server, 3)]
            scopes = [busy_scope(p) for p in answers]
            assert scopes.count(None) == 4 and set(scopes) == {None, "peer", "source"}
            assert infer.admission.quota.held(source="127.0.0.1") == 4
            other = await first_answer(elsewhere, server)
            assert busy_scope(other) is None
            assert infer.admission.quota.held(source="127.0.0.2") == 1
            assert infer.admission.admitted == 5 <= limits.slots_total
            gate.opened.set()
            assert (await other.finish()).completion_tokens >= 1
            for pending in answers:
                if busy_scope(pending) is None:
                    await pending.finish()
            assert infer.admission.admitted == 0
            assert (await ask(sybils[2], server)).completion_tokens >= 1


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


async def start_node_process(tmp: Path, tiny: Path) -> tuple[trio.Process, str, str]:
    """``python -m p2pedge.node`` serving the tiny model: (process, peer id, address)."""
    args = [sys.executable, "-m", "p2pedge.node", "--json", "--threads", "1"]
    args += ["--data-dir", str(tmp / "server"), "--model", f"{MODEL}={tiny}"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with (tmp / "server.err").open("wb") as err:
        proc = await trio.lowlevel.open_process(args, stdout=subprocess.PIPE, stderr=err, env=env)
    assert proc.stdout is not None
    buffer = b""
    with trio.fail_after(60):
        while True:
            chunk = await proc.stdout.receive_some(4096)
            assert chunk, (tmp / "server.err").read_text()
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                hello = json.loads(line)
                if hello.get("event") == "listening":
                    return proc, str(hello["peer_id"]), str(hello["addrs"][0])


@pytest.mark.slow
async def test_the_issue_requests_leave_a_node_process_up_and_small(
    config: Config, tiny: Path, tmp_path: Path
) -> None:
    """Issue 17's audit: seed 2**31 and top_k 2**40 each ended the node process with exit
    code 1. Against a real ``python -m p2pedge.node``: both are ``bad_request``; a flood
    of 40 concurrent 30 kB prompts from one peer (over the tiny model's context, so the
    admitted ones fail inside generation) gets ``too_large`` or ``infer.queue_slots``
    busy; the process stays up and serves, and its RSS grows by less than 64 MB."""
    proc, peer_id, addr = await start_node_process(tmp_path, tiny)
    try:
        async with Node(config("attacker", bootstrap=(addr,))) as attacker:

            async def honest() -> InferResult:
                stream = await attacker.open_stream(peer_id, PROTOCOL_ID)
                return await request_completion(stream, good(), timeout_s=30)

            assert (await honest()).completion_tokens >= 1
            before = rss_mb(proc.pid)
            for changes in ({"seed": 2**31}, {"top_k": 2**40}):
                answers = await send_raw(attacker, peer_id, hostile_params(**changes))
                assert [(a["t"], a["code"]) for a in answers] == [("error", "bad_request")]
                assert proc.returncode is None
            big = codec.encode_request(good()) | {
                "messages": [{"role": "user", "content": "word " * 6000}]
            }
            outcomes: list[str] = []

            async def one() -> None:
                answers = await send_raw(attacker, peer_id, big)
                last = answers[-1]
                outcomes.append(
                    last["t"] if last["t"] == "done" else last.get("limit", last["code"])
                )

            async with trio.open_nursery() as nursery:
                for _ in range(40):
                    nursery.start_soon(one)
            assert set(outcomes) <= {"done", "infer.queue_slots", "too_large"}, outcomes
            assert (await honest()).completion_tokens >= 1 and proc.returncode is None
            grown = rss_mb(proc.pid) - before
            print(f"rss before {before:.0f} MB, growth {grown:.1f} MB, outcomes {outcomes}")
            assert grown < 64
    finally:
        proc.send_signal(signal.SIGINT)
        with trio.fail_after(20):
            await proc.wait()
