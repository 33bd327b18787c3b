"""infer/1.0.0 over in-process streams: a real tiny model behind the server, typed errors,
back-pressure and timeouts (MockClock)."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
import trio.testing

from p2pedge.errors import Busy, ModelNotCached, P2PEdgeError, PeerTimeout
from p2pedge.ids import ModelId
from p2pedge.node.inference import LocalInference
from p2pedge.orchestrator.remote import LocalBackend
from p2pedge.protocols._stream import FramedStream, memory_stream_pair
from p2pedge.protocols.infer.codec import (
    GenParams,
    InferLimits,
    InferRejected,
    InferRequest,
    InferResult,
)
from p2pedge.protocols.infer.handler import InferServer, OnPiece, request_completion
from p2pedge.runtime.config import RuntimeConfig
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


async def call(server: InferServer, request: InferRequest, **kw: object) -> InferResult:
    """One exchange; the caller's error is re-raised outside the nursery, unwrapped."""
    a, b = memory_stream_pair()
    error: P2PEdgeError | None = None
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.handle, FramedStream(b), "caller")
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


async def test_full_queue_answers_busy() -> None:
    backend = GatedBackend()
    server = InferServer(backend, max_active=1, max_queue=1)
    results: list[InferResult] = []

    async def occupy() -> None:
        results.append(await call(server, req()))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(occupy)
        nursery.start_soon(occupy)
        await trio.testing.wait_all_tasks_blocked()
        assert server.admission.admitted == 2 and backend.started == 1
        with pytest.raises(Busy):
            await call(server, req())
        backend.gate.set()
    assert [r.text for r in results] == ["ok", "ok"] and server.admission.admitted == 0


async def test_silent_server_times_out(autojump_clock: trio.testing.MockClock) -> None:
    backend = GatedBackend()
    server = InferServer(backend)
    with pytest.raises(PeerTimeout):
        await call(server, req(), timeout_s=5.0)
    assert trio.current_time() == pytest.approx(5.0)
    assert server.admission.admitted == 0


async def test_garbage_from_caller_gets_bad_request() -> None:
    a, b = memory_stream_pair()
    server = InferServer(GatedBackend())
    client = FramedStream(a)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.handle, FramedStream(b), "caller")
        await client.send({"t": "infer", "v": 1, "id": 4, "model": 12})
        answer = await client.receive(timeout=5)
    assert answer["t"] == "error" and answer["code"] == "bad_request" and answer["id"] == 4
