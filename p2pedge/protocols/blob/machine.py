"""Sans-IO state for the blob protocol: the client's request/response sequence and the
server's admission gate (per-peer rate and concurrency limits). Both take ``now``.

A client stream carries one request at a time: a response while idle, or a chunk longer
than the chunk size asked for, is the peer's fault (``RemoteProtocolError``); a second
request before the answer is ours (``LocalProtocolError``). The server gate keeps, per
peer, a token bucket (``rate`` requests/s, ``burst``) and an in-flight count, so one peer
cannot monopolise the disk or the uplink; peers with nothing in flight are forgotten
first when too many are tracked.

:class:`BlobLimits` gathers every server limit of the protocol: the gate's, the bytes a
peer's replies may hold until they are written (charged to peer id, source address and
total through :class:`~p2pedge.quota.Quota`, since a reader that stops reading leaves its
replies in our memory), and the read/write deadlines of a stream.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from enum import Enum

from p2pedge.errors import Busy, LocalProtocolError, RemoteProtocolError
from p2pedge.protocols.blob.codec import (
    ChunkRequest,
    DataResponse,
    ManifestRequest,
    Request,
    Response,
    decode_response,
    encode_request,
)
from p2pedge.quota import Limit


class ClientState(Enum):
    IDLE = "idle"
    WAITING = "waiting"
    BROKEN = "broken"


class BlobClientMachine:
    """One client stream: ``send`` a request, then ``receive`` exactly one response."""

    def __init__(self, timeout: float = 30.0) -> None:
        self.state = ClientState.IDLE
        self.timeout = timeout
        self.pending: Request | None = None
        self.sent_at = 0.0

    def send(self, request: Request, now: float) -> bytes:
        """The payload to frame and write; the stream is then waiting for an answer."""
        if self.state is not ClientState.IDLE:
            raise LocalProtocolError(f"cannot send a request while {self.state.value}")
        payload = encode_request(request)
        self.state = ClientState.WAITING
        self.pending = request
        self.sent_at = now
        return payload

    def receive(self, payload: bytes, now: float) -> Response:
        """Decode and validate the answer to the pending request."""
        if self.state is not ClientState.WAITING or self.pending is None:
            self.state = ClientState.BROKEN
            raise RemoteProtocolError("peer sent a response nobody asked for")
        try:
            response = decode_response(payload)
            if isinstance(response, DataResponse) and isinstance(self.pending, ChunkRequest):
                if len(response.data) > self.pending.chunk_size:
                    raise RemoteProtocolError(
                        f"chunk of {len(response.data)} bytes exceeds {self.pending.chunk_size}"
                    )
        except RemoteProtocolError:
            self.state = ClientState.BROKEN
            raise
        self.state = ClientState.IDLE
        self.pending = None
        return response

    def expired(self, now: float) -> bool:
        return self.state is ClientState.WAITING and now - self.sent_at > self.timeout

    def fail(self) -> None:
        """The transport broke; this stream must not be reused."""
        self.state = ClientState.BROKEN


@dataclass
class _PeerBudget:
    tokens: float
    updated: float
    in_flight: int = 0


@dataclass(frozen=True)
class GateLimits:
    rate: float = 200.0
    burst: float = 64.0
    per_peer_concurrency: int = 8
    total_concurrency: int = 64
    max_tracked_peers: int = 1024

    def __post_init__(self) -> None:
        if self.rate <= 0 or self.burst < 1 or self.per_peer_concurrency < 1:
            raise LocalProtocolError("gate limits must be positive")


_MIB = 1 << 20
BYTES_IN_FLIGHT = "blob.bytes_in_flight"
REQUESTS = "blob.requests"
_BYTES_IN_FLIGHT = Limit(per_peer=32 * _MIB, per_source=64 * _MIB, total=256 * _MIB)


@dataclass(frozen=True)
class BlobLimits:
    """A blob server's limits. ``bytes_in_flight`` bounds the reply bytes read from disk
    and not yet written (a reply holds its share until ``send_bytes`` returns); a write
    that takes longer than ``write_timeout`` ends the stream (a reader that stopped);
    ``idle_timeout`` ends a stream with no request."""

    gate: GateLimits = GateLimits()
    bytes_in_flight: Limit = _BYTES_IN_FLIGHT
    idle_timeout: float = 60.0
    write_timeout: float = 30.0

    def __post_init__(self) -> None:
        if self.idle_timeout <= 0 or self.write_timeout <= 0:
            raise LocalProtocolError("blob timeouts must be positive")


class BlobServerGate:
    """Admit or refuse (``busy``) each request; ``release`` when its answer is sent."""

    def __init__(self, limits: GateLimits | None = None) -> None:
        self.limits = limits or GateLimits()
        self._peers: OrderedDict[str, _PeerBudget] = OrderedDict()
        self.in_flight = 0
        # until then a forgotten bucket could still be short of full, so an untracked
        # peer (perhaps that one, back again) must not start with a full burst
        self._refilled_at = float("-inf")
        self._now = float("-inf")  # the latest time seen, for trimming on release

    def _budget(self, peer: str, now: float) -> _PeerBudget:
        self._now = max(self._now, now)
        budget = self._peers.get(peer)
        if budget is None:
            owed = max(0.0, self._refilled_at - now) * self.limits.rate
            budget = _PeerBudget(tokens=max(0.0, self.limits.burst - owed), updated=now)
            self._peers[peer] = budget
            self._forget_idle(now, keep=peer)
        else:
            self._peers.move_to_end(peer)
            elapsed = max(0.0, now - budget.updated)
            budget.tokens = min(self.limits.burst, budget.tokens + elapsed * self.limits.rate)
            budget.updated = max(budget.updated, now)
        return budget

    def _forget_idle(self, now: float, keep: str | None = None) -> None:
        """Drop the oldest idle peers beyond the cap, full buckets first (nothing lost)."""
        excess = len(self._peers) - self.limits.max_tracked_peers
        if excess <= 0:
            return
        idle = [(p, b) for p, b in self._peers.items() if b.in_flight == 0 and p != keep]
        full_at = {
            p: b.updated + (self.limits.burst - b.tokens) / self.limits.rate for p, b in idle
        }
        for peer, _ in sorted(idle, key=lambda item: full_at[item[0]] > now)[:excess]:
            self._refilled_at = max(self._refilled_at, full_at[peer])
            del self._peers[peer]

    def admit(self, peer: str, request: Request, now: float) -> bool:
        """True: serve it now (and call :meth:`release` later); False: answer ``busy``."""
        try:
            self.enter(peer, request, now)
        except Busy:
            return False
        return True

    def enter(self, peer: str, request: Request, now: float) -> None:
        """Admit (then :meth:`release` later) or raise :class:`Busy` naming the scope."""
        if not isinstance(request, ChunkRequest | ManifestRequest):
            raise LocalProtocolError("not a blob request")
        budget = self._budget(peer, now)
        if budget.tokens < 1.0:
            raise Busy("blob: request rate over limit", limit=REQUESTS, scope="peer")
        if budget.in_flight >= self.limits.per_peer_concurrency:
            raise Busy("blob: too many requests in flight", limit=REQUESTS, scope="peer")
        if self.in_flight >= self.limits.total_concurrency:
            raise Busy("blob: server at capacity", limit=REQUESTS, scope="total")
        budget.tokens -= 1.0
        budget.in_flight += 1
        self.in_flight += 1

    def release(self, peer: str) -> None:
        budget = self._peers.get(peer)
        if budget is None or budget.in_flight == 0:
            raise LocalProtocolError(f"release for {peer} without an admitted request")
        budget.in_flight -= 1
        self.in_flight -= 1
        if budget.in_flight == 0:  # the table may have grown past the cap while all were busy
            self._forget_idle(self._now)

    def peer_in_flight(self, peer: str) -> int:
        budget = self._peers.get(peer)
        return 0 if budget is None else budget.in_flight

    def tokens(self, peer: str) -> float:
        budget = self._peers.get(peer)
        return self.limits.burst if budget is None else budget.tokens

    @property
    def tracked_peers(self) -> int:
        return len(self._peers)
