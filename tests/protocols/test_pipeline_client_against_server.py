"""The client machine against the real server machine, in memory: messages go straight
from one machine to the other (through the wire codec, as on a stream), the executor is a
causal running sum. Relayed prompts, pushed decode steps and a killed last server replayed
onto a fresh one all give the logits a chain that never failed gives, and the server's
error replies reach the client typed."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pedge.errors import LocalProtocolError, RemoteProtocolError, ShardFailed
from p2pedge.ids import LayerRange
from p2pedge.protocols.pipeline import codec
from p2pedge.protocols.pipeline.actions import Allocate, Release, Run, Send, onward
from p2pedge.protocols.pipeline.chain import ClientConfig, HopState
from p2pedge.protocols.pipeline.client_machine import ClientMachine
from p2pedge.protocols.pipeline.hop_machine import HopMachine
from p2pedge.protocols.pipeline.machine import KvBudget, ServerMachine, ShardSpec
from p2pedge.records.peer_ids import peer_id_from_ed25519

V, H, MAX_LENGTH = 11, 3, 32
A, B, C = (peer_id_from_ed25519(bytes([i]) * 32) for i in range(3))
FIRST, LAST = LayerRange(0, 1), LayerRange(1, 2)
CATALOG = {
    ("m", FIRST): ShardSpec(True, False, H, V, 4, max_length=64),
    ("m", LAST): ShardSpec(False, True, H, V, 4, max_length=64),
}


def outputs(first: bool, xs: np.ndarray) -> np.ndarray:
    """A shard's output for every position of its whole input: hidden states (first) or
    logits (last), position p from inputs 0..p only."""
    if first:
        c = np.cumsum(xs.astype(np.float32))
        return np.stack([c, c * 0.5, np.arange(len(xs), dtype=np.float32)], axis=1)
    picks = np.floor(np.cumsum(xs, axis=0).sum(axis=1)).astype(np.int64) % V
    return -np.abs(np.arange(V, dtype=np.float32)[None, :] - picks[:, None]).astype(np.float32)


def reference(tokens: list[int]) -> np.ndarray:
    return outputs(False, outputs(True, np.asarray(tokens)))[-1]


def wire(msg: codec.Message) -> codec.Message:
    """As the peer reads it off a stream."""
    return codec.from_map(codec.to_map(msg))


class Server:
    """A :class:`ServerMachine` with an executor whose KV cache is the inputs it ran."""

    def __init__(self, layers: LayerRange) -> None:
        self.first = layers == FIRST
        self.machine = ServerMachine(CATALOG, KvBudget(10_000), peer="client")
        self.caches: dict[int, list[np.ndarray]] = {}
        self.pushes: list[Run] = []  # steps whose output goes on to the next server

    def handle(self, msg: codec.Message) -> list[codec.Reply]:
        replies: list[codec.Reply] = []
        work = list(self.machine.receive(wire(msg), 0.0))
        while work:
            action = work.pop(0)
            if isinstance(action, Send):
                replies.append(action.reply)
            elif isinstance(action, Allocate):
                self.caches[action.session] = []
                work += self.machine.ready(
                    action.session, 0.0, key=bytes([action.session]) * codec.PUSH_KEY_BYTES
                )
            elif isinstance(action, Run):
                cache = self.caches[action.session][: action.start] + list(action.x[0])
                self.caches[action.session] = cache
                y = outputs(self.first, np.asarray(cache))
                end = action.start + action.x.shape[1]
                out = y[end - 1 : end] if not self.first else y[None, action.start : end]
                if action.fwd:
                    self.pushes.append(action)
                    self.pushed_y = out
                work += self.machine.step_done(action.session, out, 0.0)
            elif isinstance(action, Release):
                self.caches.pop(action.session, None)
        return [wire(r) for r in replies]  # type: ignore[misc]


class Link:
    def __init__(self, machine: HopMachine) -> None:
        self.machine = machine
        self.peer = machine.peer


def exchange(server: Server, hm: HopMachine, request: codec.Message) -> codec.Message:
    """The request's reply, as the client machine takes it (other messages skipped)."""
    for reply in server.handle(request):
        taken = hm.receive(reply)
        if taken is not None:
            return taken
    raise AssertionError("no reply")


def open_hop(server: Server, peer: str, layers: LayerRange, pushes_to: str = "") -> HopState:
    hm = HopMachine(peer, layers)
    assert isinstance(
        exchange(server, hm, hm.open("m", MAX_LENGTH, pushes_to=pushes_to)), codec.Opened
    )
    return HopState(Link(hm))  # type: ignore[arg-type]


def relay(m: ClientMachine, servers: list[Server], target: int) -> None:
    """Relay every hop through ``target``, as the driver's hop workers do."""
    while not m.settled(target):
        for k, server in enumerate(servers):
            if m.hops[k].done >= target or (span := m.relay_next(k, target)) is None:
                continue
            start, end = span
            hm = m.hops[k].conn.machine
            reply = exchange(server, hm, hm.step(m.step_input(k, start, end), start, epoch=m.epoch))
            m.accept(k, hm.output(reply, 0, 0.001, end - start), start, end, target)
            assert len(server.caches[hm.session]) == m.hops[k].done  # the server is where we are


def push_step(m: ClientMachine, servers: list[Server], target: int) -> None:
    """One decode step pushed from the first server to the last, as ``pushing.py`` does."""
    assert m.can_push(target)
    start = m.hops[0].done
    first, last = (h.conn.machine for h in m.hops)
    fwd = m.forwards(0)[1:]
    reply = exchange(servers[0], first, first.step(m.step_input(0, start, target), start, fwd=fwd))
    m.accept(0, first.output(reply, 0, 0.001, 1), start, target, target)
    run = servers[0].pushes.pop()
    (to,) = run.fwd
    assert servers[1].machine.refuse_push(to.session, run.start, 0, run.epoch) is None
    pushed = codec.Step(0, to.session, run.start, servers[0].pushed_y, to.top_k, (), to.key)
    (out,) = servers[1].handle(pushed)
    assert last.receive_pushed(out, start) is not None
    m.accept(1, last.output(out, 0, None, 1), start, target, target)


@settings(max_examples=25, deadline=None)
@given(
    prompt=st.lists(st.integers(0, V - 1), min_size=1, max_size=9),
    decode=st.lists(st.integers(0, V - 1), min_size=1, max_size=4),
    kill_at=st.integers(0, 3),
)
def test_the_client_machine_drives_real_server_machines(
    prompt: list[int], decode: list[int], kill_at: int
) -> None:
    servers = [Server(FIRST), Server(LAST)]
    m = ClientMachine(ClientConfig(max_length=MAX_LENGTH, chunk=4))
    m.started([open_hop(servers[0], A, FIRST, B), open_hop(servers[1], B, LAST)])
    target = m.feed(prompt)
    relay(m, servers, target)
    np.testing.assert_array_equal(m.last_logits, reference(prompt))
    fed = list(prompt)
    for i, token in enumerate(decode):
        if i == kill_at:  # the last server dies: a fresh one gets the history replayed
            servers[1].machine.stream_ended()
            servers[1] = Server(LAST)
            m.replaced(1, 1, [open_hop(servers[1], C, LAST)])
            assert m.replay(1) == (0, len(fed))
        target = m.feed([token])
        fed.append(token)
        if i != kill_at:  # every hop in step: the token goes server to server
            push_step(m, servers, target)
        relay(m, servers, target)  # a replay, or nothing left to do
        np.testing.assert_array_equal(m.last_logits, reference(fed))
    for server, hop in zip(servers, m.hops, strict=True):
        (closed,) = server.handle(hop.conn.machine.close())
        assert hop.conn.machine.receive(closed) is not None
        assert server.machine.budget.used == 0


def test_server_errors_reach_the_client_typed() -> None:
    """A step past max_length is our misuse (LocalProtocolError); a step on a session the
    server closed is a failed hop (ShardFailed); a reply for another session is the
    server's fault (RemoteProtocolError)."""
    server = Server(FIRST)
    hop = open_hop(server, A, FIRST)
    hm = hop.conn.machine
    with pytest.raises(LocalProtocolError):
        exchange(server, hm, hm.step(np.zeros((1, 1), np.int64), MAX_LENGTH))
    (closed,) = server.handle(hm.close())
    hm.receive(closed)
    with pytest.raises(ShardFailed):
        exchange(server, hm, hm.step(np.zeros((1, 1), np.int64), 0))
    hm.step(np.zeros((1, 1), np.int64), 0)
    with pytest.raises(RemoteProtocolError):
        hm.receive(codec.Output(hm.pending.rid, hm.session + 1, np.zeros((1, 1, H), np.float32)))  # type: ignore[union-attr]


def test_the_server_machine_says_where_an_output_goes_on() -> None:
    """Down the forward chain as it is; from a ring's last shard, the token it picked to
    the ring's head at the next position, one token fewer left; nowhere after the ring's
    last token, after end of sequence, or without a chain or a ring."""
    fwd = (codec.Forward(B, 2, b"k" * codec.PUSH_KEY_BYTES),)
    x = np.zeros((1, 3), np.int64)
    y = np.ones((1, 3, H), np.float32)
    push = onward(Run(1, 0, 4, x, False, fwd=fwd, epoch=2), y, None)
    assert push is not None and push.fwd == fwd and push.x is y and push.start == 4
    assert push.epoch == 2 and not push.ring_token
    ring = codec.Ring(fwd, 3, eos=9)
    push = onward(Run(1, 0, 4, x, True, top_k=1, ring=ring, epoch=2), y, 5)
    assert push is not None and push.ring_token and push.fwd == ring.chain
    assert push.start == 7 and push.x.tolist() == [[5]] and push.ring == ring.then()
    assert onward(Run(1, 0, 4, x, True, top_k=1, ring=ring), y, 9) is None  # end of sequence
    last = codec.Ring(fwd, 1)
    assert onward(Run(1, 0, 4, x, True, top_k=1, ring=last), y, 5) is None  # its last token
    assert onward(Run(1, 0, 4, x, True), y, None) is None
