"""Server-to-server push at the protocol level: a pushed step runs in the session its key
names and answers that session's owner; unknown or stale keys are refused; a server pushes
its output on. Real ``PipelineServer`` + onnxruntime over in-process streams."""

from __future__ import annotations

import secrets
import threading
from collections.abc import Awaitable, Callable
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
from p2pedge.protocols.pipeline.push import Pusher
from p2pedge.protocols.pipeline.sampling import SamplingSpec, pick
from p2pedge.records.peer_ids import peer_id_from_ed25519
from p2pedge.runtime.shard_session import ShardModel, ShardSession
from p2pedge.testing.shards import tiny_shards

MODEL = "tiny"
FIRST, LAST = LayerRange(0, 2), LayerRange(2, 4)
# servers dial the peers clients name: the codec takes only real peer ids
FIRST_ID, SECOND_ID, LAST_ID = (peer_id_from_ed25519(bytes([i]) * 32) for i in range(3))


@pytest.fixture(scope="module")
def shards() -> dict[LayerRange, Any]:
    return tiny_shards([(0, 2), (2, 4)], n_layers=4, seed=1)[0]


class Peer:
    """One client stream to a server."""

    def __init__(self, stream: FramedStream) -> None:
        self.stream = stream
        self.rid = 0

    async def send(self, msg: codec.Message) -> None:
        self.rid += 1
        await self.stream.send(codec.to_map(msg) | {"rid": self.rid})

    async def next(self) -> codec.Message:
        return codec.from_map(await self.stream.receive(timeout=10))

    async def ask(self, msg: codec.Message) -> codec.Message:
        await self.send(msg)
        return await self.next()


def connector(server: PipelineServer, nursery: trio.Nursery) -> Callable[[], Peer]:
    def connect() -> Peer:
        ours, theirs = memory_stream_pair()
        nursery.start_soon(server.handle, FramedStream(theirs), "peer")
        return Peer(FramedStream(ours))

    return connect


async def nowhere_opener(peer: str, protocol: str) -> FramedStream:
    raise AssertionError("this server pushes nowhere")


def pushing_server(
    shards: dict[LayerRange, Any], layers: LayerRange, nursery: trio.Nursery, opener: Any = None
) -> PipelineServer:
    server = PipelineServer({(MODEL, layers): shards[layers]}, offload=False)
    server.pusher = Pusher(opener or nowhere_opener, nursery)
    return server


async def owner_and_pusher(
    shards: dict[LayerRange, Any], nursery: trio.Nursery
) -> tuple[PipelineServer, Peer, Peer, int, bytes]:
    """A last-blocks server, a client that opened a session there, and another peer
    holding nothing but that session's push key."""
    server = pushing_server(shards, LAST, nursery)
    connect = connector(server, nursery)
    owner, pusher = connect(), connect()
    opened = await owner.ask(codec.Open(0, MODEL, LAST.start, LAST.end, 32))
    assert isinstance(opened, codec.Opened)
    return server, owner, pusher, opened.session, opened.key


async def test_a_pushed_step_runs_in_the_keyed_session_and_answers_its_owner(
    shards: dict[LayerRange, Any],
) -> None:
    hidden = np.random.default_rng(0).standard_normal((1, 3, 64)).astype(np.float32)
    async with trio.open_nursery() as nursery:
        connect = connector(pushing_server(shards, LAST, nursery), nursery)
        owner, other = connect(), connect()
        opened = await owner.ask(codec.Open(0, MODEL, LAST.start, LAST.end, 32))
        assert isinstance(opened, codec.Opened) and len(opened.key) == codec.PUSH_KEY_BYTES
        sid, key = opened.session, opened.key
        await other.send(codec.Step(0, sid, 0, hidden, 1, (), key))
        pushed = await owner.next()  # the output goes to the owner, as rid 0
        assert isinstance(pushed, codec.Output) and pushed.rid == 0 and pushed.session == sid
        again = await owner.ask(codec.Step(0, sid, 0, hidden, 1))  # same step, same answer
        assert isinstance(again, codec.Output) and np.array_equal(again.y, pushed.y)
        assert pushed.ids is not None and again.ids is not None
        assert np.array_equal(again.ids, pushed.ids)
        stranger = await other.ask(codec.Step(0, sid, 0, hidden, 0, (), secrets.token_bytes(16)))
        assert isinstance(stranger, codec.Error) and stranger.code == codec.E_UNKNOWN_SESSION
        assert isinstance(await owner.ask(codec.Close(0, sid)), codec.Closed)
        stale = await other.ask(codec.Step(0, sid, 0, hidden, 0, (), key))
        assert isinstance(stale, codec.Error) and stale.code == codec.E_UNKNOWN_SESSION
        nursery.cancel_scope.cancel()


async def test_a_late_pushed_copy_is_refused_to_the_pusher_not_the_owner(
    shards: dict[LayerRange, Any],
) -> None:
    """The client relayed a step itself after its push was late; the pushed copy that
    then arrives must neither rewind the session nor send the owner an error."""
    hidden = np.random.default_rng(0).standard_normal((1, 2, 64)).astype(np.float32)
    async with trio.open_nursery() as nursery:
        server, owner, pusher, sid, key = await owner_and_pusher(shards, nursery)
        relayed = await owner.ask(codec.Step(0, sid, 0, hidden, 1))  # positions 0 and 1
        assert isinstance(relayed, codec.Output)
        late = await pusher.ask(codec.Step(0, sid, 0, hidden, 1, (), key))  # start 0 again
        assert isinstance(late, codec.Error) and late.code == codec.E_BAD_REQUEST
        assert server.pushes_refused == 1 and server.steps_pushed_in == 0
        # the session still holds both positions, and the owner's stream has no stray error
        nxt = await owner.ask(codec.Step(0, sid, 2, hidden[:, :1], 1))
        assert isinstance(nxt, codec.Output) and nxt.rid == owner.rid
        nursery.cancel_scope.cancel()


async def test_a_server_pushes_its_output_on_to_the_next_server(
    shards: dict[LayerRange, Any],
) -> None:
    ids = np.array([[3, 14, 15, 92]], np.int64)
    async with trio.open_nursery() as nursery:
        second = pushing_server(shards, LAST, nursery)
        to_second = connector(second, nursery)

        def opener(peer: str, protocol: str) -> Awaitable[FramedStream]:
            assert peer == SECOND_ID and protocol == codec.PROTOCOL_ID

            async def open_stream() -> FramedStream:
                return to_second().stream

            return open_stream()

        first = pushing_server(shards, FIRST, nursery, opener)
        client_first, client_second = connector(first, nursery)(), to_second()
        a = await client_first.ask(codec.Open(0, MODEL, FIRST.start, FIRST.end, 32))
        b = await client_second.ask(codec.Open(0, MODEL, LAST.start, LAST.end, 32))
        assert isinstance(a, codec.Opened) and isinstance(b, codec.Opened)
        fwd = (codec.Forward(SECOND_ID, b.session, b.key, 1),)
        hidden = await client_first.ask(codec.Step(0, a.session, 0, ids, 0, fwd))
        assert isinstance(hidden, codec.Output) and hidden.y.shape == (1, 4, 64)
        pushed = await client_second.next()
        assert isinstance(pushed, codec.Output) and pushed.rid == 0
        relayed = await client_second.ask(codec.Step(0, b.session, 0, hidden.y, 1))
        assert isinstance(relayed, codec.Output) and np.array_equal(relayed.y, pushed.y)
        assert first.pusher is not None and first.pusher.pushed == 1
        assert second.steps_pushed_in == 1
        nursery.cancel_scope.cancel()


async def test_the_pusher_keeps_a_bounded_set_of_streams() -> None:
    from p2pedge.protocols.pipeline import push

    opened: list[FramedStream] = []
    received: list[dict[str, Any]] = []

    async def opener(peer: str, protocol: str) -> FramedStream:
        ours, theirs = memory_stream_pair()
        far = FramedStream(theirs)
        nursery.start_soon(sink, far)
        opened.append(FramedStream(ours))
        return opened[-1]

    async def sink(stream: FramedStream) -> None:
        try:
            while True:
                received.append(await stream.receive())
        except PeerUnavailable:  # the pusher closed it
            return

    hidden = np.zeros((1, 1, 64), np.float32)
    async with trio.open_nursery() as nursery:
        pusher = Pusher(opener, nursery)
        for i in range(push.MAX_PUSH_STREAMS + 1):
            target = (codec.Forward(f"peer-{i}", 1, bytes(16)),)
            assert await pusher.push(target, 0, hidden)
        assert pusher.pushed == push.MAX_PUSH_STREAMS + 1
        assert len(pusher.peers) == push.MAX_PUSH_STREAMS
        assert "peer-0" not in pusher.peers  # the oldest made room
        assert await pusher.push((codec.Forward("peer-0", 1, bytes(16)),), 0, hidden)
        assert len(opened) == push.MAX_PUSH_STREAMS + 2  # it had to be opened again
        nursery.cancel_scope.cancel()
    assert len(received) >= push.MAX_PUSH_STREAMS


class StuckWrites:
    """Fault injection: a stream whose writes never complete until it is reset (a next
    server that stopped reading, its socket buffer full)."""

    def __init__(self) -> None:
        self.was_reset = trio.Event()

    async def read(self, n: int | None = None) -> bytes:
        await self.was_reset.wait()
        return b""

    async def write(self, data: bytes) -> None:
        await self.was_reset.wait()
        raise trio.ClosedResourceError("reset while writing")

    async def close(self) -> None:
        self.was_reset.set()

    async def reset(self) -> None:
        self.was_reset.set()


async def test_a_push_stuck_in_send_is_dropped_after_the_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    stuck = StuckWrites()

    async def opener(peer: str, protocol: str) -> FramedStream:
        return FramedStream(stuck)

    async with trio.open_nursery() as nursery:
        pusher = Pusher(opener, nursery, timeout=2.0)
        began = trio.current_time()
        with trio.fail_after(10):  # without the watchdog the send would hang
            ok = await pusher.push(
                (codec.Forward("frozen", 1, bytes(16)),), 0, np.zeros((1, 1, 4), np.float32)
            )
        waited = trio.current_time() - began
        assert not ok and pusher.failed == 1 and pusher.pushed == 0
        assert stuck.was_reset.is_set()
        assert 2.0 < waited <= 3.0  # noticed by the watchdog, every timeout / 2
        assert pusher.peers == []


class GatedSession(ShardSession):
    """Fault injection: a real shard session whose steps wait for a gate (a server that
    is slow to finish a pushed step)."""

    def __init__(self, model: ShardModel, max_length: int, gate: threading.Event) -> None:
        super().__init__(model, max_length)
        self.gate = gate

    def step(self, x: np.ndarray, start: int, *, last_only: bool = True) -> np.ndarray:
        assert self.gate.wait(timeout=30)
        return super().step(x, start, last_only=last_only)


async def test_a_relayed_copy_of_the_running_pushed_step_gets_its_result() -> None:
    """The client's grace time ran out and it relayed the step a push is still running:
    it gets that step's output under its own rid, not a busy error."""
    model = tiny_shards([(2, 4)], n_layers=4, seed=1)[0][LAST]
    gate = threading.Event()
    model.new_session = lambda max_length: GatedSession(model, max_length, gate)  # type: ignore[method-assign]
    hidden = np.random.default_rng(0).standard_normal((1, 1, 64)).astype(np.float32)
    async with trio.open_nursery() as nursery:
        server = PipelineServer({(MODEL, LAST): model})  # steps in worker threads
        server.pusher = Pusher(nowhere_opener, nursery)
        connect = connector(server, nursery)
        owner, pusher = connect(), connect()
        opened = await owner.ask(codec.Open(0, MODEL, LAST.start, LAST.end, 32))
        assert isinstance(opened, codec.Opened)
        await pusher.send(codec.Step(0, opened.session, 0, hidden, 1, (), opened.key))
        await trio.testing.wait_all_tasks_blocked()  # the pushed step waits at the gate
        await owner.send(codec.Step(0, opened.session, 0, hidden.copy(), 1))
        await trio.testing.wait_all_tasks_blocked()  # the relayed copy was taken in
        gate.set()
        first, second = await owner.next(), await owner.next()
        assert isinstance(first, codec.Output) and first.rid == 0
        assert isinstance(second, codec.Output) and second.rid == owner.rid
        assert np.array_equal(first.y, second.y)
        assert server.steps_served == 1  # computed once
        nursery.cancel_scope.cancel()


async def _ring_pair(
    shards: dict[LayerRange, Any], nursery: trio.Nursery
) -> tuple[PipelineServer, PipelineServer, Peer, Peer]:
    """Servers for the first and the last blocks that push to each other by name, and a
    client stream to each."""
    servers: dict[str, PipelineServer] = {}

    def opener(peer: str, protocol: str) -> Awaitable[FramedStream]:
        async def open_stream() -> FramedStream:
            return connector(servers[peer], nursery)().stream

        return open_stream()

    servers[FIRST_ID] = pushing_server(shards, FIRST, nursery, opener)
    servers[LAST_ID] = pushing_server(shards, LAST, nursery, opener)
    return (
        servers[FIRST_ID],
        servers[LAST_ID],
        connector(servers[FIRST_ID], nursery)(),
        connector(servers[LAST_ID], nursery)(),
    )


async def _open_both(a: Peer, b: Peer) -> tuple[codec.Opened, codec.Opened]:
    first = await a.ask(codec.Open(0, MODEL, FIRST.start, FIRST.end, 32))
    last = await b.ask(codec.Open(0, MODEL, LAST.start, LAST.end, 32))
    assert isinstance(first, codec.Opened) and isinstance(last, codec.Opened)
    return first, last


async def _relayed_tokens(a: Peer, b: Peer, token: int, n: int) -> list[int]:
    """The greedy tokens after ``token``, the client relaying every step itself."""
    first, last = await _open_both(a, b)
    out = []
    for at in range(n):
        hidden = await a.ask(codec.Step(0, first.session, at, np.array([[token]], np.int64)))
        assert isinstance(hidden, codec.Output)
        logits = await b.ask(codec.Step(0, last.session, at, hidden.y, 1))
        assert isinstance(logits, codec.Output) and logits.ids is not None
        token = int(logits.ids[0, 0])
        out.append(token)
    return out


async def _start_ring(a: Peer, b: Peer, left: int, **ring: Any) -> codec.Opened:
    """Fresh sessions on both servers, and token 7 fed to the first at position 0 as a
    ring of ``left`` tokens (``ring``: the rest of :class:`codec.Ring`); the first
    server's session."""
    first, last = await _open_both(a, b)
    chain = (
        codec.Forward(FIRST_ID, first.session, first.key),
        codec.Forward(LAST_ID, last.session, last.key, 1),
    )
    x = np.array([[7]], np.int64)
    await a.send(
        codec.Step(0, first.session, 0, x, 0, chain[1:], ring=codec.Ring(chain, left, **ring))
    )
    return first


async def _ring_outputs(a: Peer, b: Peer, count: int) -> list[int]:
    """The tokens of the ring's first ``count`` steps, each checked at both servers."""
    tokens = []
    for i in range(count):
        hidden = await a.next()
        assert isinstance(hidden, codec.Output) and hidden.rid == (a.rid if i == 0 else 0)
        logits = await b.next()
        assert isinstance(logits, codec.Output) and logits.rid == 0 and logits.ids is not None
        tokens.append(int(logits.ids[0, 0]))
    return tokens


async def test_the_last_server_feeds_greedy_tokens_round_the_ring(
    shards: dict[LayerRange, Any],
) -> None:
    async with trio.open_nursery() as nursery:
        first_server, last_server, a, b = await _ring_pair(shards, nursery)
        expected = await _relayed_tokens(a, b, 7, 4)
        first = await _start_ring(a, b, 4)
        assert await _ring_outputs(a, b, 4) == expected
        # three tokens went back to the head; the fourth ended the ring
        assert last_server.ring_steps_sent == 3 and first_server.steps_pushed_in == 3
        # the sessions hold all four positions: the client carries on from position 4
        nxt = await a.ask(codec.Step(0, first.session, 4, np.array([[expected[-1]]], np.int64)))
        assert isinstance(nxt, codec.Output) and nxt.rid == a.rid
        nursery.cancel_scope.cancel()


async def test_a_sampled_ring_picks_what_the_client_would_pick(
    shards: dict[LayerRange, Any],
) -> None:
    """The last server samples from its full logits with the ring's spec and names the
    token; the client, relaying with all logits and the same spec, picks the same."""
    spec = SamplingSpec(temperature=1.5, top_k=0, top_p=0.95, seed=7)
    async with trio.open_nursery() as nursery:
        _, last_server, a, b = await _ring_pair(shards, nursery)
        first, last = await _open_both(a, b)
        expected, token = [], 7
        for at in range(5):  # relayed, every logit, picked here
            hidden = await a.ask(codec.Step(0, first.session, at, np.array([[token]], np.int64)))
            assert isinstance(hidden, codec.Output)
            logits = await b.ask(codec.Step(0, last.session, at, hidden.y))
            assert isinstance(logits, codec.Output) and logits.ids is None
            token = pick(logits.y, spec, at + 1)
            expected.append(token)
        assert len(set(expected)) > 1  # sampled, not one token over and over
        await _start_ring(a, b, 5, sampling=spec)
        named = []
        for _ in range(5):
            out = await b.next()
            while not isinstance(out, codec.Output) or out.rid != 0:
                out = await b.next()
            named.append(out.token)
        assert named == expected and last_server.ring_steps_sent == 4
        nursery.cancel_scope.cancel()


async def test_a_ring_stops_at_end_of_sequence(shards: dict[LayerRange, Any]) -> None:
    async with trio.open_nursery() as nursery:
        _, last_server, a, b = await _ring_pair(shards, nursery)
        expected = await _relayed_tokens(a, b, 7, 4)
        first = await _start_ring(a, b, 8, eos=expected[1])
        assert await _ring_outputs(a, b, 2) == expected[:2]
        assert last_server.ring_steps_sent == 1  # nothing was pushed after the end token
        closed = await a.ask(codec.Close(0, first.session))  # idle: no step came round again
        assert isinstance(closed, codec.Closed)
        nursery.cancel_scope.cancel()


async def test_pushes_from_an_abandoned_ring_epoch_are_refused(
    shards: dict[LayerRange, Any],
) -> None:
    hidden = np.random.default_rng(0).standard_normal((1, 1, 64)).astype(np.float32)
    async with trio.open_nursery() as nursery:
        server, owner, pusher, sid, key = await owner_and_pusher(shards, nursery)
        # the client gave up on ring 0: its own step carries epoch 1
        mine = await owner.ask(codec.Step(0, sid, 0, hidden, 1, epoch=1))
        assert isinstance(mine, codec.Output)
        stale = await pusher.ask(codec.Step(0, sid, 1, hidden, 1, (), key, epoch=0))
        assert isinstance(stale, codec.Error) and "epoch" in stale.message
        await pusher.send(codec.Step(0, sid, 1, hidden, 1, (), key, epoch=1))
        pushed = await owner.next()  # a push from the current epoch runs, for the owner
        assert isinstance(pushed, codec.Output) and pushed.rid == 0
        assert server.steps_pushed_in == 1 and server.pushes_refused == 1
        # a ring's last shard must be asked for the top-k it picks the token from
        chain = (codec.Forward(FIRST_ID, 1, key), codec.Forward(LAST_ID, sid, key))
        bad = await owner.ask(codec.Step(0, sid, 2, hidden, 0, ring=codec.Ring(chain, 2)))
        assert isinstance(bad, codec.Error) and bad.code == codec.E_BAD_REQUEST
        nursery.cancel_scope.cancel()


async def test_a_failing_warm_up_or_push_is_contained_and_warm_ups_are_bounded() -> None:
    """The pusher's tasks run in the node's nursery: a dial that raises anything (the
    audit's ``ID.from_base58`` ValueError, or a bug) must end only that attempt. Warm-ups
    in flight are bounded, since each dials a peer a client named."""
    gate = trio.Event()
    dialled: list[str] = []

    async def opener(peer: str, protocol: str) -> FramedStream:
        dialled.append(peer)
        if peer == "raises":
            raise ValueError("invalid base58")
        await gate.wait()
        raise PeerUnavailable(f"no address known for {peer}")

    async with trio.open_nursery() as nursery:
        pusher = Pusher(opener, nursery, max_warming=2)
        pusher.warm("raises")
        await trio.testing.wait_all_tasks_blocked()
        for peer in ("a", "b", "c"):
            pusher.warm(peer)
        await trio.testing.wait_all_tasks_blocked()
        assert sorted(dialled) == ["a", "b", "raises"] and pusher.warm_skipped == 1
        gate.set()
        await trio.testing.wait_all_tasks_blocked()
        pusher.warm("c")  # room again once the others failed
        await trio.testing.wait_all_tasks_blocked()
        assert dialled[-1] == "c" and pusher.warmed == 0
        hidden = np.zeros((1, 1, 4), np.float32)
        assert not await pusher.push((codec.Forward("a", 1, bytes(16)),), 0, hidden)
        assert pusher.failed == 1
        nursery.cancel_scope.cancel()
