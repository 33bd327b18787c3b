"""The pipeline server against hostile and careless clients: typed errors, nothing shared
breaks, quotas per peer and per source address, steps served fairly by peer. Real
``PipelineServer`` + onnxruntime over in-process streams."""

from __future__ import annotations

import struct
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

import numpy as np
import pytest
import trio
import trio.testing

from p2pedge.errors import PeerUnavailable
from p2pedge.ids import LayerRange
from p2pedge.protocols._stream import FramedStream, memory_stream_pair
from p2pedge.protocols.pipeline import codec
from p2pedge.protocols.pipeline.fair import FairLimiter
from p2pedge.protocols.pipeline.handler import PipelineServer
from p2pedge.protocols.pipeline.limits import PipelineLimits
from p2pedge.quota import Limit
from p2pedge.runtime.shard_session import ShardModel, ShardSession
from p2pedge.testing.shards import tiny_shards

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


# the fixture's tests are about the total KV budget: one peer may take all of it
WHOLE_BUDGET = PipelineLimits(kv_peer_share=1.0, kv_source_share=1.0)


@pytest.fixture
async def served(shards: dict[LayerRange, Any]) -> AsyncIterator[tuple[PipelineServer, Any]]:
    server = make_server(shards, budget_bytes=60_000, idle_timeout=30, limits=WHOLE_BUDGET)
    async with trio.open_nursery() as nursery:

        def connect(peer: str = "test-peer", source: str = "") -> Client:
            ours, theirs = memory_stream_pair()
            nursery.start_soon(server.handle, FramedStream(theirs, source=source), peer)
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
    a, b = connect(), connect("other-peer", "10.0.0.2")
    per_token = 2 * 2 * 16 * 2 * 4  # blocks * kv heads * head dim * (k, v) * fp32
    first = await a.open(FIRST, max_length=100)
    assert isinstance(first, codec.Opened) and first.kv_bytes == 100 * per_token
    assert isinstance(first, codec.Opened)
    refused = await b.open(FIRST, max_length=64)
    assert isinstance(refused, codec.Error) and refused.code == codec.E_BUDGET
    assert (refused.limit, refused.scope) == ("pipeline.kv_bytes", "total")
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


async def test_a_session_waits_longer_for_its_first_step_than_between_steps(
    shards: dict[LayerRange, Any], autojump_clock: trio.testing.MockClock
) -> None:
    # downstream hops are opened with the route and wait while hop 0 computes the prompt
    server = make_server(shards, idle_timeout=30, first_step_timeout=300)
    async with trio.open_nursery() as nursery:
        ours, theirs = memory_stream_pair()
        nursery.start_soon(server.handle, FramedStream(theirs), "slow-prompt")
        c = Client(FramedStream(ours))
        stepped, waiting = await c.open(FIRST), await c.open(FIRST)
        assert isinstance(stepped, codec.Opened) and isinstance(waiting, codec.Opened)
        held = server.budget.used
        await trio.sleep(200)  # long past the idle timeout, no step yet: both live
        assert server.budget.used == held
        assert isinstance(await c.step(stepped.session, 0, ids(1)), codec.Output)
        await trio.sleep(40)  # its deadline moved from 300 to 230 with that first step
        assert 0 < server.budget.used < held
        late = await c.step(stepped.session, 1, ids(2))
        assert isinstance(late, codec.Error) and late.code == codec.E_EXPIRED
        await trio.sleep(70)
        assert server.budget.used == 0
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


async def test_sessions_and_kv_bytes_are_charged_to_peer_source_and_total(
    shards: dict[LayerRange, Any],
) -> None:
    """One peer cannot take every session; new peer ids on its address share its source
    limit; another address still gets sessions; refusals name the limit and scope."""
    limits = PipelineLimits(sessions=Limit(2, 3, 100), kv_peer_share=0.5, kv_source_share=1.0)
    server = make_server(shards, budget_bytes=60_000, limits=limits)
    async with trio.open_nursery() as nursery:

        def connect(peer: str, source: str) -> Client:
            ours, theirs = memory_stream_pair()
            nursery.start_soon(server.handle, FramedStream(theirs, source=source), peer)
            return Client(FramedStream(ours))

        def refused(reply: codec.Message, limit: str, scope: str) -> bool:
            return isinstance(reply, codec.Error) and (reply.code, reply.limit, reply.scope) == (
                codec.E_BUDGET,
                limit,
                scope,
            )

        hoarder = [connect("hoarder", "10.0.0.1") for _ in range(3)]
        assert isinstance(await hoarder[0].open(FIRST, 8), codec.Opened)
        assert isinstance(await hoarder[1].open(FIRST, 8), codec.Opened)
        assert refused(await hoarder[2].open(FIRST, 8), "pipeline.sessions", "peer")
        minted = [connect(f"minted-{i}", "10.0.0.1") for i in range(2)]
        assert isinstance(await minted[0].open(FIRST, 8), codec.Opened)
        assert refused(await minted[1].open(FIRST, 8), "pipeline.sessions", "source")
        assert server.quotas.sessions.held(source="10.0.0.1") == 3  # not 2 per peer id
        # KV bytes: half the budget per peer (60 000 / 2 = 30 000; 100 tokens take 51 200)
        other = connect("other", "10.0.0.2")
        assert refused(await other.open(FIRST, max_length=100), "pipeline.kv_bytes", "peer")
        assert isinstance(await other.open(FIRST, max_length=40), codec.Opened)
        for c in (*hoarder, *minted):
            await c.stream.close()
        assert isinstance(await other.open(FIRST, 8), codec.Opened)
        await other.stream.close()
        await trio.testing.wait_all_tasks_blocked()
        assert server.quotas.sessions.held() == server.quotas.kv_bytes.held() == 0
        assert server.budget.used == 0
        nursery.cancel_scope.cancel()


class GatedSession(ShardSession):
    """Fault injection: a real shard session whose steps record their size, then wait for a
    gate (a long step holding the compute thread)."""

    def __init__(
        self, model: ShardModel, max_length: int, gate: threading.Event, log: list[int]
    ) -> None:
        super().__init__(model, max_length)
        self.gate, self.log = gate, log

    def step(self, x: np.ndarray, start: int, *, last_only: bool = True) -> np.ndarray:
        self.log.append(int(x.shape[1]))
        assert self.gate.wait(timeout=30)
        return super().step(x, start, last_only=last_only)


def gated(shards: dict[LayerRange, Any]) -> tuple[ShardModel, threading.Event, list[int]]:
    model = tiny_shards([(0, 2)], n_layers=4, seed=1)[0][FIRST]
    gate, log = threading.Event(), []
    model.new_session = lambda n: GatedSession(model, n, gate, log)  # type: ignore[method-assign]
    return model, gate, log


async def test_steps_wait_for_the_compute_thread_round_robin_by_peer(
    shards: dict[LayerRange, Any],
) -> None:
    """A flooder with an 8-token step queued on each of four streams does not delay a
    normal client's one-token step at all: it takes the decode lane and runs beside the
    flood step already running (first come, first served: it waited for all four; one
    lane, round robin by cost: for the running one)."""
    model, gate, log = gated(shards)
    server = PipelineServer({(MODEL, FIRST): model}, inline_step_s=0.0)
    async with trio.open_nursery() as nursery:

        def connect(peer: str) -> Client:
            ours, theirs = memory_stream_pair()
            nursery.start_soon(server.handle, FramedStream(theirs, source="10.0.0.1"), peer)
            return Client(FramedStream(ours))

        flood, calm = [connect("flooder") for _ in range(4)], connect("calm")
        sessions = []
        for c in (*flood, calm):
            opened = await c.open(FIRST, max_length=64)
            assert isinstance(opened, codec.Opened)
            sessions.append(opened.session)
        for c, sid in zip(flood, sessions, strict=False):  # 8-token steps
            await c.stream.send(codec.to_map(codec.Step(1, sid, 0, ids(*range(8)))))
            await trio.testing.wait_all_tasks_blocked()
        await calm.stream.send(codec.to_map(codec.Step(1, sessions[-1], 0, ids(5))))
        await trio.testing.wait_all_tasks_blocked()
        # three flood steps wait behind the first; the calm one runs beside it
        assert (server.fair.borrowed, server.fair.waiting) == (1, 3)
        assert (server.decode_lane.borrowed, server.decode_lane.waiting) == (1, 0)
        gate.set()
        assert isinstance(codec.from_map(await calm.stream.receive(timeout=30)), codec.Output)
        for c in flood:
            assert isinstance(codec.from_map(await c.stream.receive(timeout=30)), codec.Output)
        assert sorted(log) == [1, 8, 8, 8, 8] and not server.decode_lane.busy
        nursery.cancel_scope.cancel()


async def test_a_long_step_takes_its_turns_in_chunks(shards: dict[LayerRange, Any]) -> None:
    """A 64-position step runs 16 positions per turn, and a one-token step from another
    peer does not wait for it (it runs beside, in the decode lane); the output is the
    unchunked one's (hidden states of every position, to float tolerance)."""
    model, gate, log = gated(shards)
    limits = PipelineLimits(step_chunk=16)
    server = PipelineServer({(MODEL, FIRST): model}, inline_step_s=0.0, limits=limits)
    long = ids(*range(1, 65))
    async with trio.open_nursery() as nursery:
        clients = []
        for peer in ("flooder", "calm"):
            ours, theirs = memory_stream_pair()
            nursery.start_soon(server.handle, FramedStream(theirs), peer)
            clients.append(Client(FramedStream(ours)))
        flood, calm = clients
        opened = [await c.open(FIRST, max_length=128) for c in clients]
        assert all(isinstance(o, codec.Opened) for o in opened)
        sf, sc = (o.session for o in opened if isinstance(o, codec.Opened))
        await flood.stream.send(codec.to_map(codec.Step(1, sf, 0, long)))
        await trio.testing.wait_all_tasks_blocked()  # its first chunk holds the thread
        await calm.stream.send(codec.to_map(codec.Step(1, sc, 0, ids(5))))
        await trio.testing.wait_all_tasks_blocked()
        # the calm step is in its own lane, not queued behind the long one (which of the two
        # threads computes first is the OS's)
        assert (server.decode_lane.borrowed, server.decode_lane.waiting) == (1, 0)
        gate.set()
        chunked = codec.from_map(await flood.stream.receive(timeout=30))
        assert isinstance(codec.from_map(await calm.stream.receive(timeout=30)), codec.Output)
        assert sorted(log) == [1, 16, 16, 16, 16]  # the long step went in chunks of 16
        whole = shards[FIRST].new_session(128).step(long, 0, last_only=False)
        assert isinstance(chunked, codec.Output) and chunked.y.shape == whole.shape
        np.testing.assert_allclose(chunked.y, whole, rtol=1e-4, atol=1e-4)
        nursery.cancel_scope.cancel()


async def test_a_chunked_last_shard_step_gives_the_last_position_logits(
    shards: dict[LayerRange, Any],
) -> None:
    server = make_server(
        shards, offload=True, inline_step_s=0.0, limits=PipelineLimits(step_chunk=4)
    )
    hidden = np.random.default_rng(3).standard_normal((1, 10, 64)).astype(np.float32)
    async with trio.open_nursery() as nursery:
        ours, theirs = memory_stream_pair()
        nursery.start_soon(server.handle, FramedStream(theirs), "peer")
        c = Client(FramedStream(ours))
        opened = await c.open(LAST)
        assert isinstance(opened, codec.Opened)
        out = await c.ask(codec.to_map(codec.Step(0, opened.session, 0, hidden, top_k=3)))
        whole = shards[LAST].new_session(32).step(hidden, 0)
        values, top = codec.top_k_of(whole, 3)
        assert isinstance(out, codec.Output) and out.ids is not None
        assert np.array_equal(out.ids, top)
        np.testing.assert_allclose(out.y, values, rtol=1e-4, atol=1e-4)
        nursery.cancel_scope.cancel()


async def test_a_full_step_queue_refuses_with_busy_and_the_session_goes_on(
    shards: dict[LayerRange, Any],
) -> None:
    model, gate, _ = gated(shards)
    limits = PipelineLimits(queued_steps=Limit(1, 8, 8))
    server = PipelineServer({(MODEL, FIRST): model}, inline_step_s=0.0, limits=limits)
    async with trio.open_nursery() as nursery:
        streams = []
        for _ in range(2):
            ours, theirs = memory_stream_pair()
            nursery.start_soon(server.handle, FramedStream(theirs, source="10.0.0.1"), "peer")
            streams.append(Client(FramedStream(ours)))
        a, b = streams
        sa, sb = [await c.open(FIRST) for c in (a, b)]
        assert isinstance(sa, codec.Opened) and isinstance(sb, codec.Opened)
        await a.stream.send(codec.to_map(codec.Step(1, sa.session, 0, ids(1, 2))))
        await trio.testing.wait_all_tasks_blocked()  # a's step holds the peer's one slot
        refused = await b.step(sb.session, 0, ids(3))
        assert isinstance(refused, codec.Error) and refused.code == codec.E_BUDGET
        assert (refused.limit, refused.scope) == ("pipeline.queued_steps", "peer")
        gate.set()
        assert isinstance(codec.from_map(await a.stream.receive(timeout=30)), codec.Output)
        assert isinstance(await b.step(sb.session, 0, ids(3)), codec.Output)  # still open
        assert server.quotas.queued_steps.held() == 0
        nursery.cancel_scope.cancel()


async def test_the_fair_limiter_serves_the_least_served_source_then_peer() -> None:
    fair, order = FairLimiter(1), []
    async with trio.open_nursery() as nursery:
        await fair.acquire("first", "s1")

        async def wait_turn(name: str, peer: str, source: str, cost: int = 1) -> None:
            async with fair.slot(peer, source, cost):
                order.append(name)

        async def cancelled() -> None:
            with trio.move_on_after(0):  # a waiter that gives up leaves no hole
                await fair.acquire("quitter", "s3")

        for name, peer, source in [
            ("a1", "a", "s1"),
            ("a2", "a", "s1"),
            ("a3", "a", "s1"),
            ("b1", "b", "s1"),
            ("c1", "c", "s2"),
        ]:
            nursery.start_soon(wait_turn, name, peer, source)
            await trio.testing.wait_all_tasks_blocked()
        await cancelled()
        assert fair.waiting == 5
        fair.release("first", "s1")
    # s1 was served (first) while s2 waited: c1 goes first; then a and b of s1 in turn
    assert order == ["c1", "a1", "b1", "a2", "a3"]  # FIFO: a1 a2 a3 b1 c1
    assert not fair.busy


async def test_the_fair_limiter_charges_what_each_step_costs() -> None:
    """A peer running 255-position steps is 255 ahead of a newcomer, who starts level
    with it (not ahead by its idle time): the newcomer's short steps all go first."""
    fair, order = FairLimiter(1), []
    async with trio.open_nursery() as nursery:
        await fair.acquire("big", "s", 255)

        async def wait_turn(name: str, peer: str, cost: int) -> None:
            async with fair.slot(peer, "s", cost):
                order.append(name)

        for name, peer, cost in [
            ("big2", "big", 255),
            *[(f"small{i}", "small", 1) for i in range(3)],
        ]:
            nursery.start_soon(wait_turn, name, peer, cost)
            await trio.testing.wait_all_tasks_blocked()
        fair.release("big", "s")
    assert order == ["small0", "small1", "small2", "big2"]  # FIFO: big2 first


def test_busy_answers_read_as_busy_naming_the_limit() -> None:
    from p2pedge.errors import Busy
    from p2pedge.protocols.pipeline.connection import error_to_exception

    exc = error_to_exception(codec.Error(1, codec.E_BUDGET, "x", "pipeline.sessions", "peer"), "p")
    assert isinstance(exc, Busy)
    assert (exc.limit, exc.scope) == ("pipeline.sessions", "peer")


_: Callable[..., Any] = make_server
