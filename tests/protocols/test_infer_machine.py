"""infer/1.0.0 sans-IO machines: ordering rules, stateful testing with hypothesis."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from p2pedge.errors import Busy, LocalProtocolError, PeerTimeout, RemoteProtocolError
from p2pedge.protocols.infer.codec import InferLimits, InferRequest, InferResult
from p2pedge.protocols.infer.machine import (
    Accepted,
    Admission,
    ClientState,
    Completed,
    Failed,
    InferClient,
    InferServerMachine,
    Piece,
    ServerState,
)
from p2pedge.quota import Grant

LIMITS = InferLimits(max_piece_chars=8, max_text_chars=40)
RESULT = InferResult("abc", 1, 1, 0.1, 10.0, "stop", "cpu")


def new_pair(timeout: float = 5.0) -> tuple[InferClient, InferServerMachine, dict[str, Any]]:
    client = InferClient(
        InferRequest(3, "m@1", (("user", "hi"),)), limits=LIMITS, timeout_s=timeout
    )
    server = InferServerMachine(LIMITS)
    first = client.start(now=0.0)
    req = server.receive_request(first)
    assert isinstance(req, InferRequest)
    return client, server, first


def test_happy_path_splits_long_pieces() -> None:
    client, server, _ = new_pair()
    assert client.receive(server.accept(0), 1.0) == Accepted(0)
    frames = server.piece("0123456789abc")
    assert [f["text"] for f in frames] == ["01234567", "89abc"]
    assert [client.receive(f, 1.0) for f in frames] == [Piece("01234567"), Piece("89abc")]
    assert client.receive(server.done(RESULT), 1.0) == Completed(RESULT)
    assert client.finished and server.state is ServerState.CLOSED


def test_client_rejects_out_of_order_and_foreign_frames() -> None:
    client, _server, _ = new_pair()
    with pytest.raises(RemoteProtocolError):
        client.receive({"t": "piece", "id": 3, "text": "x"}, 1.0)
    client, _server, _ = new_pair()
    with pytest.raises(RemoteProtocolError):
        client.receive({"t": "accepted", "id": 99, "queue": 0}, 1.0)
    assert client.state is ClientState.FAILED


def test_client_bounds_total_answer() -> None:
    client, server, _ = new_pair()
    client.receive(server.accept(0), 0.0)
    with pytest.raises(RemoteProtocolError):
        for _ in range(10):
            for frame in server.piece("xxxxxxxx"):
                client.receive(frame, 0.0)


def test_deadline_turns_late_frames_into_timeout() -> None:
    client, server, _ = new_pair(timeout=2.0)
    event = client.receive(server.accept(0), now=3.0)
    assert isinstance(event, Failed) and isinstance(event.error, PeerTimeout)


def test_server_refuses_second_request_and_misuse() -> None:
    _, server, first = new_pair()
    with pytest.raises(RemoteProtocolError):
        server.receive_request(first)
    with pytest.raises(LocalProtocolError):
        server.done(RESULT)


def test_too_large_is_answered_not_raised() -> None:
    server = InferServerMachine(InferLimits(max_prompt_chars=4))
    client = InferClient(InferRequest(5, "m@1", (("user", "hi"),)))
    msg = client.start(0.0)
    msg["messages"] = [{"role": "user", "content": "far too long"}]
    answer = server.receive_request(msg)
    assert isinstance(answer, dict) and answer["code"] == "too_large" and answer["id"] == 5


class InferExchange(RuleBasedStateMachine):
    """Random interleavings of server actions, client deliveries and misuse."""

    def __init__(self) -> None:
        super().__init__()
        self.client, self.server, _ = new_pair(timeout=100.0)
        self.outbox: list[dict[str, Any]] = []
        self.now = 0.0
        self.pieces: list[str] = []
        self.outcome: Any = None

    @precondition(lambda self: self.server.state is ServerState.QUEUED)
    @rule(queue=st.integers(0, 5))
    def accept(self, queue: int) -> None:
        self.outbox.append(self.server.accept(queue))

    @precondition(lambda self: self.server.state is ServerState.QUEUED)
    @rule(code=st.sampled_from(["busy", "unknown_model"]))
    def reject(self, code: str) -> None:
        self.outbox.append(self.server.reject(code, "no"))

    @precondition(lambda self: self.server.state is ServerState.RUNNING)
    @rule(text=st.text(max_size=12))
    def piece(self, text: str) -> None:
        self.outbox.extend(self.server.piece(text))

    @precondition(lambda self: self.server.state is ServerState.RUNNING)
    @rule()
    def finish(self) -> None:
        self.outbox.append(self.server.done(RESULT))

    @precondition(lambda self: self.server.state is ServerState.RUNNING)
    @rule()
    def fail(self) -> None:
        self.outbox.append(self.server.fail("internal", "boom"))

    @rule()
    def server_misuse_is_local_error(self) -> None:
        state = self.server.state
        if state is not ServerState.RUNNING:
            with pytest.raises(LocalProtocolError):
                self.server.piece("x")
        if state is not ServerState.QUEUED:
            with pytest.raises(LocalProtocolError):
                self.server.accept(0)
        assert self.server.state is state

    @precondition(lambda self: bool(self.outbox) and not self.client.finished)
    @rule(dt=st.floats(0, 1))
    def deliver(self, dt: float) -> None:
        self.now += dt
        try:
            event = self.client.receive(self.outbox.pop(0), self.now)
        except RemoteProtocolError as exc:
            self.outcome = exc
            return
        if isinstance(event, Piece):
            self.pieces.append(event.text)
        elif isinstance(event, Completed | Failed):
            self.outcome = event

    @invariant()
    def client_state_matches_outcome(self) -> None:
        if isinstance(self.outcome, Completed):
            assert self.client.state is ClientState.DONE
        if isinstance(self.outcome, Failed | RemoteProtocolError):
            assert self.client.state is ClientState.FAILED
        if self.client.finished:
            with pytest.raises(RemoteProtocolError):
                self.client.receive({"t": "piece", "id": 3, "text": "late"}, self.now)

    @invariant()
    def pieces_respect_limits(self) -> None:
        assert all(len(p) <= LIMITS.max_piece_chars for p in self.pieces)
        assert self.client.received_chars <= LIMITS.max_text_chars


InferExchange.TestCase.settings = settings(max_examples=60, stateful_step_count=25, deadline=None)
TestInferExchange = InferExchange.TestCase


ADMISSION = InferLimits(max_active=2, slots_per_peer=2, slots_per_source=3, slots_total=5)
SOURCE_OF = {"a": "10.0.0.1", "b": "10.0.0.1", "c": "10.0.0.2", "d": "10.0.0.3"}


class AdmissionMachine(RuleBasedStateMachine):
    """Slots per peer, per source address and in total, against a model of the books: a
    refusal names the scope that ran out, positions count from ``max_active``."""

    def __init__(self) -> None:
        super().__init__()
        self.adm = Admission(ADMISSION)
        self.grants: list[Grant] = []

    def held(self, *, peer: str | None = None, source: str | None = None) -> int:
        return sum(1 for g in self.grants if peer in (None, g.peer) and source in (None, g.source))

    @rule(peer=st.sampled_from(sorted(SOURCE_OF)))
    def admit(self, peer: str) -> None:
        source = SOURCE_OF[peer]
        full = [
            scope
            for scope, held, cap in (
                ("peer", self.held(peer=peer), ADMISSION.slots_per_peer),
                ("source", self.held(source=source), ADMISSION.slots_per_source),
                ("total", self.held(), ADMISSION.slots_total),
            )
            if held >= cap
        ]
        if full:
            with pytest.raises(Busy) as refused:
                self.adm.admit(peer, source)
            assert refused.value.limit == "infer.queue_slots"
            assert refused.value.scope == full[0]
            return
        grant, position = self.adm.admit(peer, source)
        self.grants.append(grant)
        assert position == max(0, len(self.grants) - ADMISSION.max_active)

    @precondition(lambda self: bool(self.grants))
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        grant = self.grants.pop(data.draw(st.integers(0, len(self.grants) - 1)))
        self.adm.release(grant)

    @invariant()
    def books_match(self) -> None:
        assert self.adm.admitted == len(self.grants) <= ADMISSION.slots_total
        for peer, source in SOURCE_OF.items():
            assert self.adm.quota.held(peer=peer) == self.held(peer=peer)
            assert self.adm.quota.held(source=source) == self.held(source=source)


TestAdmission = AdmissionMachine.TestCase


def test_busy_frame_carries_the_limit_and_scope() -> None:
    client, server, _ = new_pair()
    frame = server.reject("busy", "full", limit="infer.queue_slots", scope="source")
    event = client.receive(frame, 1.0)
    assert isinstance(event, Failed) and isinstance(event.error, Busy)
    assert (event.error.limit, event.error.scope) == ("infer.queue_slots", "source")


@pytest.mark.parametrize(
    "frame",
    [
        {"t": "error", "id": 3, "code": "busy", "message": "x", "scope": "planet"},
        {"t": "error", "id": 3, "code": "busy", "message": "x", "limit": "l" * 65},
        {"t": "error", "id": 3, "code": "busy", "message": "x" * 1025},
        {"t": "done", "id": 3, "text": "", "prompt_tokens": 1, "completion_tokens": 1,
         "ttft_s": float("nan"), "tok_per_s": 1.0, "finish_reason": "stop", "provider": ""},
    ],
)  # fmt: skip
def test_client_blames_a_server_for_hostile_answers(frame: dict[str, Any]) -> None:
    client, server, _ = new_pair()
    client.receive(server.accept(0), 1.0)
    with pytest.raises(RemoteProtocolError):
        client.receive(frame, 1.0)
    assert client.state is ClientState.FAILED
