"""The pipeline server against hostile and careless clients: typed errors, nothing shared
breaks. Real ``PipelineServer`` + onnxruntime over in-process streams."""

from __future__ import annotations

import struct
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import pytest
import trio
import trio.testing

from p2pedge.errors import PeerUnavailable
from p2pedge.ids import LayerRange
from p2pedge.protocols._stream import FramedStream, memory_stream_pair
from p2pedge.protocols.pipeline import codec
from p2pedge.protocols.pipeline.handler import PipelineServer
from p2pedge.protocols.pipeline.local import tiny_shards

MODEL = "tiny"
FIRST, LAST = LayerRange(0, 2), LayerRange(2, 4)


@pytest.fixture(scope="module")
def shards() -> dict[LayerRange, Any]:
    return tiny_shards([(0, 2), (2, 4)], n_layers=4, seed=1)[0]


def make_server(shards: dict[LayerRange, Any], **kw: Any) -> PipelineServer:
    kw.setdefault("offload", False)
    return PipelineServer({(MODEL, r): m for r, m in shards.items()}, **kw)


class Client:
    def __init__(self, stream: FramedStream) -> None:
        self.stream = stream
        self.rid = 0

    async def ask(self, msg: dict[str, Any]) -> codec.Message:
        self.rid += 1
        await self.stream.send({**msg, "rid": self.rid})
        return codec.from_map(await self.stream.receive(timeout=10))

    async def open(self, layers: LayerRange, max_length: int = 32, **kw: Any) -> codec.Message:
        m = codec.to_map(codec.Open(0, MODEL, layers.start, layers.end, max_length, **kw))
        return await self.ask(m)

    async def step(self, session: int, start: int, x: np.ndarray) -> codec.Message:
        return await self.ask(codec.to_map(codec.Step(0, session, start, x)))


@pytest.fixture
async def served(shards: dict[LayerRange, Any]) -> AsyncIterator[tuple[PipelineServer, Any]]:
    server = make_server(shards, budget_bytes=60_000, idle_timeout=30)
    async with trio.open_nursery() as nursery:

        def connect() -> Client:
            ours, theirs = memory_stream_pair()
            nursery.start_soon(server.handle, FramedStream(theirs), "test-peer")
            return Client(FramedStream(ours))

        yield server, connect
        nursery.cancel_scope.cancel()


def ids(*tokens: int) -> np.ndarray:
    return np.array([tokens], dtype=np.int64)


async def test_bad_requests_get_typed_errors_and_session_survives(served: Any) -> None:
    _, connect = served
    c = connect()
    opened = await c.open(FIRST)
    assert isinstance(opened, codec.Opened)
    sid = opened.session
    hidden = np.zeros((1, 2, 64), np.float32)
    cases = [
        (await c.step(sid, 0, hidden), codec.E_BAD_REQUEST),  # hidden to a first shard
        (await c.step(sid, 0, ids(1, 10_000)), codec.E_BAD_REQUEST),  # id past vocab
        (await c.step(sid, 5, ids(1)), codec.E_BAD_REQUEST),  # start past cache
        (await c.step(sid, 31, ids(1, 2)), codec.E_BAD_REQUEST),  # past max_length
        (await c.step(999, 0, ids(1)), codec.E_UNKNOWN_SESSION),
        (await c.open(LayerRange(0, 3)), codec.E_UNSUPPORTED),
        (await c.open(FIRST, max_length=100_000), codec.E_BAD_REQUEST),
        (await c.ask({"t": "step", "session": sid}), codec.E_BAD_REQUEST),
    ]
    for reply, code in cases:
        assert isinstance(reply, codec.Error) and reply.code == code, reply
    good = await c.step(sid, 0, ids(1, 2, 3))
    assert isinstance(good, codec.Output) and good.y.shape == (1, 3, 64)
    # A resent step (same start) is idempotent thanks to the rewind.
    again = await c.step(sid, 0, ids(1, 2, 3))
    assert isinstance(again, codec.Output) and np.array_equal(again.y, good.y)


async def test_steps_after_close_and_wrong_hidden_dtype(served: Any) -> None:
    _, connect = served
    c = connect()
    opened = await c.open(LAST, dtype="float16")
    assert isinstance(opened, codec.Opened)
    sid = opened.session
    wrong = await c.step(sid, 0, np.zeros((1, 1, 64), np.float32))
    assert isinstance(wrong, codec.Error) and "float16" in wrong.message
    out = await c.step(sid, 0, np.zeros((1, 2, 64), np.float16))
    assert isinstance(out, codec.Output) and out.y.ndim == 2 and out.y.dtype == np.float32
    assert isinstance(await c.ask(codec.to_map(codec.Close(0, sid))), codec.Closed)
    after = await c.step(sid, 2, np.zeros((1, 1, 64), np.float16))
    assert isinstance(after, codec.Error) and after.code == codec.E_CLOSED


async def test_budget_refusal_leaves_others_running(served: Any) -> None:
    server, connect = served
    a, b = connect(), connect()
    per_token = 2 * 2 * 16 * 2 * 4  # blocks * kv heads * head dim * (k, v) * fp32
    first = await a.open(FIRST, max_length=100)
    assert isinstance(first, codec.Opened) and first.kv_bytes == 100 * per_token
    assert isinstance(first, codec.Opened)
    refused = await b.open(FIRST, max_length=64)
    assert isinstance(refused, codec.Error) and refused.code == codec.E_BUDGET
    assert "free" in refused.message
    assert isinstance(await a.step(first.session, 0, ids(4, 5)), codec.Output)
    await a.stream.close()  # a's sessions are freed when its stream ends ...
    with pytest.raises(PeerUnavailable):
        await a.stream.receive(timeout=5)  # ... before the server closes its end
    assert server.budget.used == 0
    assert isinstance(await b.open(FIRST, max_length=64), codec.Opened)


async def test_garbage_and_oversized_frames_end_only_that_stream(served: Any) -> None:
    _, connect = served
    good, bad = connect(), connect()
    opened = await good.open(FIRST)
    assert isinstance(opened, codec.Opened)
    await bad.stream.send_bytes(b"\xc1")  # never valid msgpack
    reply = codec.from_map(await bad.stream.receive(timeout=5))
    assert isinstance(reply, codec.Error) and reply.code == codec.E_BAD_REQUEST
    await bad.stream.stream.write(struct.pack(">I", 1 << 31))
    reply = codec.from_map(await bad.stream.receive(timeout=5))
    assert isinstance(reply, codec.Error)
    with pytest.raises(PeerUnavailable):
        await bad.stream.receive(timeout=5)
    assert isinstance(await good.step(opened.session, 0, ids(1)), codec.Output)


async def test_idle_sessions_expire(
    shards: dict[LayerRange, Any], autojump_clock: trio.testing.MockClock
) -> None:
    server = make_server(shards, idle_timeout=30)
    async with trio.open_nursery() as nursery:
        ours, theirs = memory_stream_pair()
        nursery.start_soon(server.handle, FramedStream(theirs), "idle-peer")
        c = Client(FramedStream(ours))
        opened = await c.open(FIRST)
        assert isinstance(opened, codec.Opened) and server.budget.used > 0
        await trio.sleep(29)
        assert isinstance(await c.step(opened.session, 0, ids(1)), codec.Output)
        await trio.sleep(31)
        assert server.budget.used == 0
        late = await c.step(opened.session, 1, ids(2))
        assert isinstance(late, codec.Error) and late.code == codec.E_EXPIRED
        nursery.cancel_scope.cancel()


def test_layers_served_for_the_card(shards: dict[LayerRange, Any]) -> None:
    assert make_server(shards).layers_served() == [
        {"model": MODEL, "start": 0, "end": 2},
        {"model": MODEL, "start": 2, "end": 4},
    ]


async def test_a_session_past_the_rotary_table_is_refused_at_open(
    shards: dict[LayerRange, Any],
) -> None:
    """A middle shard has no position Gather; its bound comes from RotaryEmbedding's cos
    cache, so a too-long session is a bad request, not an onnxruntime failure mid-step."""
    assert {r: m.context_length for r, m in shards.items()} == {FIRST: 256, LAST: 256}
    server = make_server(shards)
    async with trio.open_nursery() as nursery:
        ours, theirs = memory_stream_pair()
        nursery.start_soon(server.handle, FramedStream(theirs), "test-peer")
        client = Client(FramedStream(ours))
        refused = await client.open(LAST, max_length=257)
        assert isinstance(refused, codec.Error) and refused.code == codec.E_BAD_REQUEST
        assert "256" in refused.message
        assert isinstance(await client.open(LAST, max_length=256), codec.Opened)
        nursery.cancel_scope.cancel()
