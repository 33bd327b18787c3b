"""Blob machines: client request/response sequence and the server's admission gate."""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from p2pedge.errors import Busy, LocalProtocolError, RemoteProtocolError
from p2pedge.ids import ModelId
from p2pedge.protocols.blob.codec import (
    ChunkRequest,
    DataResponse,
    ErrorResponse,
    ManifestRequest,
    encode_response,
)
from p2pedge.protocols.blob.machine import (
    BlobClientMachine,
    BlobLimits,
    BlobServerGate,
    ClientState,
    GateLimits,
)

DIGEST = "cd" * 32


class ClientSequence(RuleBasedStateMachine):
    """Any order of sends and (good, oversized, unsolicited, garbage) answers."""

    def __init__(self) -> None:
        super().__init__()
        self.machine = BlobClientMachine(timeout=5.0)
        self.now = 0.0
        self.asked: int | None = None
        self.broken = False

    @rule(size=st.integers(1024, 8192), dt=st.floats(0, 3))
    def send_chunk_request(self, size: int, dt: float) -> None:
        self.now += dt
        request = ChunkRequest(DIGEST, 0, size)
        if self.broken or self.asked is not None:
            with pytest.raises(LocalProtocolError):
                self.machine.send(request, self.now)
            return
        assert self.machine.send(request, self.now)
        self.asked = size

    @rule()
    def send_manifest_request(self) -> None:
        if self.broken or self.asked is not None:
            with pytest.raises(LocalProtocolError):
                self.machine.send(ManifestRequest(ModelId("m")), self.now)
            return
        self.machine.send(ManifestRequest(ModelId("m")), self.now)
        self.asked = 1 << 30

    @rule(length=st.integers(0, 9000))
    def receive_data(self, length: int) -> None:
        payload = encode_response(DataResponse(b"z" * length))
        if self.broken or self.asked is None or length > self.asked:
            with pytest.raises(RemoteProtocolError):
                self.machine.receive(payload, self.now)
            self.broken = True
            return
        assert self.machine.receive(payload, self.now) == DataResponse(b"z" * length)
        self.asked = None

    @precondition(lambda self: self.asked is not None and not self.broken)
    @rule()
    def receive_error(self) -> None:
        response = self.machine.receive(encode_response(ErrorResponse("busy")), self.now)
        assert response == ErrorResponse("busy")
        self.asked = None

    @rule(junk=st.binary(max_size=20))
    def receive_garbage(self, junk: bytes) -> None:
        with pytest.raises(RemoteProtocolError):
            self.machine.receive(b"\xc1" + junk, self.now)
        self.broken = True

    @rule(dt=st.floats(0, 10))
    def time_passes(self, dt: float) -> None:
        self.now += dt

    @invariant()
    def state_matches_model(self) -> None:
        if self.broken:
            assert self.machine.state is ClientState.BROKEN
        elif self.asked is None:
            assert self.machine.state is ClientState.IDLE
            assert not self.machine.expired(self.now)
        else:
            assert self.machine.state is ClientState.WAITING
            assert self.machine.expired(self.now) == (self.now - self.machine.sent_at > 5.0)


class GateModel(RuleBasedStateMachine):
    """Admissions never exceed the caps, the bucket never goes negative or over burst."""

    limits = GateLimits(
        rate=2.0, burst=3.0, per_peer_concurrency=2, total_concurrency=3, max_tracked_peers=3
    )

    def __init__(self) -> None:
        super().__init__()
        self.gate = BlobServerGate(self.limits)
        self.now = 0.0
        self.held: dict[str, int] = {}
        self.admitted: dict[str, list[float]] = {}

    @rule(peer=st.sampled_from(["a", "b", "c", "d", "e"]))
    def admit(self, peer: str) -> None:
        if self.gate.admit(peer, ChunkRequest(DIGEST, 0, 4096), self.now):
            self.held[peer] = self.held.get(peer, 0) + 1
            self.admitted.setdefault(peer, []).append(self.now)

    @rule(peer=st.sampled_from(["a", "b", "c", "d", "e"]))
    def release(self, peer: str) -> None:
        if self.held.get(peer, 0) == 0:
            with pytest.raises(LocalProtocolError):
                self.gate.release(peer)
            return
        self.gate.release(peer)
        self.held[peer] -= 1

    @rule(dt=st.floats(0, 2))
    def time_passes(self, dt: float) -> None:
        self.now += dt

    @invariant()
    def caps_hold(self) -> None:
        assert self.gate.in_flight == sum(self.held.values()) <= self.limits.total_concurrency
        for peer, count in self.held.items():
            assert self.gate.peer_in_flight(peer) == count <= self.limits.per_peer_concurrency
            assert 0.0 <= self.gate.tokens(peer) <= self.limits.burst

    @invariant()
    def rate_holds(self) -> None:
        for times in self.admitted.values():
            for start in times:
                window = [t for t in times if start <= t <= start + 1.0]
                assert len(window) <= self.limits.burst + self.limits.rate * 1.0 + 1e-9

    @invariant()
    def busy_peers_are_remembered(self) -> None:
        assert self.gate.tracked_peers <= max(
            self.limits.max_tracked_peers, sum(1 for c in self.held.values() if c) + 1
        )


TestClientSequence = ClientSequence.TestCase
TestClientSequence.settings = settings(max_examples=80, stateful_step_count=30, deadline=None)
TestGateModel = GateModel.TestCase
TestGateModel.settings = settings(max_examples=80, stateful_step_count=40, deadline=None)


def test_busy_when_bucket_empty_then_refills() -> None:
    gate = BlobServerGate(GateLimits(rate=1.0, burst=2.0, per_peer_concurrency=10))
    request = ChunkRequest(DIGEST, 0, 4096)
    assert gate.admit("p", request, 0.0) and gate.admit("p", request, 0.0)
    assert not gate.admit("p", request, 0.0)
    assert gate.admit("q", request, 0.0)
    assert gate.admit("p", request, 1.0)


def test_forgotten_peer_release_is_local_error() -> None:
    with pytest.raises(LocalProtocolError):
        BlobServerGate().release("nobody")


def test_churning_other_peers_does_not_refill_a_drained_bucket() -> None:
    """Forgetting a drained peer to make room must not hand it a full burst on return."""
    gate = BlobServerGate(GateLimits(rate=1.0, burst=2.0, max_tracked_peers=2))
    request = ChunkRequest(DIGEST, 0, 4096)
    for _ in range(2):
        assert gate.admit("drained", request, 0.0)
        gate.release("drained")
    assert not gate.admit("drained", request, 0.0)
    for stranger in ("s1", "s2", "s3"):  # each new peer pushes the oldest idle one out
        if gate.admit(stranger, request, 0.0):
            gate.release(stranger)
    assert gate.tracked_peers <= 2
    assert not gate.admit("drained", request, 0.0)  # still owes its burst
    # newcomers share that debt until the forgotten bucket would have refilled
    assert not gate.admit("s4", request, 0.5)
    assert gate.admit("drained", request, 1.0)  # one token back after a second


def test_gate_refusals_name_the_limit_and_scope() -> None:
    gate = BlobServerGate(GateLimits(rate=1e-6, burst=2.0, per_peer_concurrency=1))
    request = ChunkRequest(DIGEST, 0, 4096)
    gate.enter("p", request, 0.0)
    with pytest.raises(Busy) as crowded:
        gate.enter("p", request, 0.0)
    assert (crowded.value.limit, crowded.value.scope) == ("blob.requests", "peer")
    gate.release("p")
    gate.enter("p", request, 0.0)
    gate.release("p")
    with pytest.raises(Busy, match="rate"):
        gate.enter("p", request, 0.0)
    assert gate.in_flight == 0


@pytest.mark.parametrize("field", ["idle_timeout", "write_timeout"])
def test_blob_limits_refuse_non_positive_timeouts(field: str) -> None:
    with pytest.raises(LocalProtocolError):
        BlobLimits(**{field: 0.0})  # type: ignore[arg-type]
