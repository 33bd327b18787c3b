"""infer/1.0.0 over in-process streams: a real tiny model behind the server, typed errors,
back-pressure and timeouts (MockClock)."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from p2pedge.errors import (
    Busy,
    ModelNotCached,
    P2PEdgeError,
    PeerTimeout,
    PeerUnavailable,
    RemoteProtocolError,
)
from p2pedge.ids import ModelId
from p2pedge.node.inference import LocalInference
from p2pedge.orchestrator.remote import LocalBackend
from p2pedge.protocols._stream import FramedStream, contain, memory_stream_pair
from p2pedge.protocols.infer import codec
from p2pedge.protocols.infer.codec import (
    GenParams,
    InferLimits,
    InferRejected,
    InferRequest,
    InferResult,
)
from p2pedge.protocols.infer.handler import InferServer, OnPiece, request_completion
from p2pedge.runtime.config import RuntimeConfig
from p2pedge.runtime.sampling import PromptTooLong
from p2pedge.testing import build_tiny_model


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("infer") / "tiny", seed=5)


def req(model: str = "tiny@latest", text: str = "hello", max_tokens: int = 4) -> InferRequest:
    return InferRequest(1, model, (("user", text),), None, GenParams(max_tokens=max_tokens))


class GatedBackend:
    """Fault injector: holds every request until ``gate`` is set (a stuck model)."""

    def __init__(self) -> None:
        self.gate = trio.Event()
        self.started = 0

    async def serves(self, model: str) -> bool:
        return True

    async def run(self, request: InferRequest, on_piece: OnPiece) -> InferResult:
        self.started += 1
        await self.gate.wait()
        await on_piece("ok")
        return InferResult("ok", 1, 1, 0.0, 1.0, "stop", "gated")


async def call(
    server: InferServer, request: InferRequest, peer: str = "caller", source: str = "", **kw: object
) -> InferResult:
    """One exchange, the handler contained as the node runs it; the caller's error is
    re-raised outside the nursery, unwrapped."""
    a, b = memory_stream_pair()
    error: P2PEdgeError | None = None
    async with trio.open_nursery() as nursery:
        nursery.start_soon(contain, server.handle(FramedStream(b, source=source), peer), "t", peer)
        try:
            return await request_completion(FramedStream(a), request, **kw)  # type: ignore[arg-type]
        except P2PEdgeError as exc:
            error = exc
    assert error is not None
    raise error


async def test_remote_completion_with_real_model(tiny_dir: Path) -> None:
    def resolve(mid: ModelId) -> Path:
        if mid.name != "tiny":
            raise ModelNotCached(str(mid))
        return tiny_dir

    local = LocalInference(resolve, RuntimeConfig(max_models=2, intra_op_threads=1))
    try:
        server = InferServer(LocalBackend(local, "peer-x"))
        pieces: list[str] = []

        async def on_piece(text: str) -> None:
            pieces.append(text)

        result = await call(server, req(), on_piece=on_piece)
        assert result.completion_tokens >= 1 and result.provider.startswith("peer-x:")
        assert "".join(pieces) == result.text and server.served == 1
        with pytest.raises(ModelNotCached):
            await call(server, req(model="other@1"))
    finally:
        local.close()


async def test_oversized_prompt_is_refused_with_typed_error() -> None:
    server = InferServer(GatedBackend(), limits=InferLimits(max_prompt_chars=10))
    with pytest.raises(InferRejected, match="too_large"):
        await call(server, req(text="x" * 11))


async def test_full_queue_answers_busy_naming_the_scope() -> None:
    """Slots per peer, per source address and in total, each refusal a typed Busy."""
    backend = GatedBackend()
    limits = InferLimits(max_active=1, slots_per_peer=2, slots_per_source=3, slots_total=4)
    server = InferServer(backend, limits=limits)
    results: list[InferResult] = []

    async def occupy(peer: str, source: str) -> None:
        results.append(await call(server, req(), peer, source))

    async with trio.open_nursery() as nursery:
        for peer, source in (("a", "10.0.0.1"), ("a", "10.0.0.1"), ("b", "10.0.0.1")):
            nursery.start_soon(occupy, peer, source)
        await trio.testing.wait_all_tasks_blocked()
        assert server.admission.admitted == 3 and backend.started == 1
        refusals = []
        for peer, source in (("a", "10.0.0.2"), ("c", "10.0.0.1")):
            with pytest.raises(Busy) as refused:
                await call(server, req(), peer, source)
            refusals.append((refused.value.limit, refused.value.scope))
        assert refusals == [("infer.queue_slots", "peer"), ("infer.queue_slots", "source")]
        nursery.start_soon(occupy, "d", "10.0.0.3")  # the last slot, from another address
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(Busy) as refused:
            await call(server, req(), "e", "10.0.0.4")
        assert refused.value.scope == "total"
        backend.gate.set()
    assert [r.text for r in results] == ["ok"] * 4 and server.admission.admitted == 0


async def test_silent_server_times_out(autojump_clock: trio.testing.MockClock) -> None:
    backend = GatedBackend()
    server = InferServer(backend)
    with pytest.raises(PeerTimeout):
        await call(server, req(), timeout_s=5.0)
    assert trio.current_time() == pytest.approx(5.0)
    assert server.admission.admitted == 0


async def server_exchange(
    server: InferServer, frame: dict[str, Any]
) -> tuple[list[dict[str, Any]], Exception | None]:
    """Send one raw frame straight to ``server.handle``: every frame it answers with
    (until it closes the stream) and the error the handler raised, if any, unwrapped."""
    a, b = memory_stream_pair()
    client = FramedStream(a)
    error: Exception | None = None
    answers: list[dict[str, Any]] = []

    async def serve() -> None:
        nonlocal error
        try:
            await server.handle(FramedStream(b), "caller")
        except Exception as exc:  # inspected by the test
            error = exc

    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve)
        await client.send(frame)
        with contextlib.suppress(PeerUnavailable):
            while True:
                answers.append(await client.receive(timeout=5))
    return answers, error


async def test_garbage_from_caller_gets_bad_request() -> None:
    server = InferServer(GatedBackend())
    answers, error = await server_exchange(server, {"t": "infer", "v": 1, "id": 4, "model": 12})
    assert answers == [
        {"t": "error", "id": 4, "code": "bad_request", "message": "field 'model' has type int"}
    ]
    assert isinstance(error, RemoteProtocolError)  # answered, then raised for contain to log


class FailingBackend:
    """Fault injector: the backend raises what it was given (inside the server's nursery)."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    async def serves(self, model: str) -> bool:
        return True

    async def run(self, request: InferRequest, on_piece: OnPiece) -> InferResult:
        await trio.lowlevel.checkpoint()
        raise self.error


@pytest.mark.parametrize(
    ("error", "code", "raised"),
    [
        (PromptTooLong(300, 128), "too_large", None),
        (ValueError("prompt is empty"), "bad_request", None),
        (ModelNotCached("m@1"), "unknown_model", None),
        (Busy("queue", limit="inference.queue", scope="total"), "busy", Busy),
        (RuntimeError("genai exploded"), "internal", RuntimeError),
    ],
)
async def test_backend_failures_reach_the_caller_typed(
    error: Exception, code: str, raised: type[Exception] | None
) -> None:
    """A failure inside the backend (an ExceptionGroup member in the nursery) is answered
    with its code; hostile or unexpected ones are raised bare afterwards, for the log."""
    server = InferServer(FailingBackend(error))
    answers, exc = await server_exchange(server, codec.encode_request(req()))
    assert [a["t"] for a in answers] == ["accepted", "error"] and answers[1]["code"] == code
    assert type(exc) is raised if raised else exc is None
    assert server.admission.admitted == 0
    if code == "busy":
        assert (answers[1]["limit"], answers[1]["scope"]) == ("inference.queue", "total")
