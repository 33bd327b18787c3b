"""Sans-IO state machines for one infer exchange, plus admission by quota.

The machines take ``now`` and never await, so every ordering rule (no piece before
``accepted``, nothing after ``done``, the right request id, a bounded total answer) is
tested without sockets. Our own misuse is a :class:`LocalProtocolError`; a peer breaking
the order is a :class:`RemoteProtocolError`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from p2pedge.errors import LocalProtocolError, PeerTimeout, RemoteProtocolError
from p2pedge.protocols.infer import codec
from p2pedge.protocols.infer.codec import InferLimits, InferRequest, InferResult
from p2pedge.quota import Grant, Limit, Quota

QUEUE_SLOTS = "infer.queue_slots"


class ClientState(enum.Enum):
    IDLE = "idle"
    SENT = "sent"
    STREAMING = "streaming"
    DONE = "done"
    FAILED = "failed"


@dataclass(frozen=True)
class Accepted:
    queue: int


@dataclass(frozen=True)
class Piece:
    text: str


@dataclass(frozen=True)
class Completed:
    result: InferResult


@dataclass(frozen=True)
class Failed:
    error: Exception


ClientEvent = Accepted | Piece | Completed | Failed


class InferClient:
    """The caller's side: one request, its pieces, one outcome, under a deadline."""

    def __init__(
        self, request: InferRequest, *, limits: InferLimits | None = None, timeout_s: float = 60.0
    ) -> None:
        self.request = request
        self.limits = limits or InferLimits()
        self.timeout_s = timeout_s
        self.state = ClientState.IDLE
        self.deadline: float | None = None
        self.received_chars = 0

    def start(self, now: float) -> dict[str, Any]:
        """The request frame to send; starts the deadline clock."""
        if self.state is not ClientState.IDLE:
            raise LocalProtocolError(f"request already sent (state {self.state.value})")
        msg = codec.encode_request(self.request, self.limits)
        self.state = ClientState.SENT
        self.deadline = now + self.timeout_s
        return msg

    @property
    def finished(self) -> bool:
        return self.state in (ClientState.DONE, ClientState.FAILED)

    def time_left(self, now: float) -> float:
        if self.deadline is None:
            raise LocalProtocolError("request not started")
        return max(0.0, self.deadline - now)

    def timed_out(self, now: float) -> Failed:
        """Declare the deadline passed (the IO layer saw no frame in time)."""
        if self.finished:
            raise LocalProtocolError("exchange already finished")
        self.state = ClientState.FAILED
        return Failed(PeerTimeout(f"no answer within {self.timeout_s:.3g} s"))

    def receive(self, msg: dict[str, Any], now: float) -> ClientEvent:
        """Feed one frame from the server; returns what it means."""
        if self.state in (ClientState.IDLE, ClientState.DONE, ClientState.FAILED):
            raise RemoteProtocolError(f"unexpected frame in state {self.state.value}")
        if self.deadline is not None and now > self.deadline:
            return self.timed_out(now)
        kind = msg.get("t")
        if msg.get("id") != self.request.id:
            self.state = ClientState.FAILED
            raise RemoteProtocolError(f"answer for request {msg.get('id')!r}, not ours")
        try:
            return self._dispatch(kind, msg)
        except RemoteProtocolError:
            self.state = ClientState.FAILED
            raise

    def _dispatch(self, kind: Any, msg: dict[str, Any]) -> ClientEvent:
        if kind == "accepted":
            if self.state is not ClientState.SENT:
                raise RemoteProtocolError("accepted twice")
            queue = msg.get("queue")
            if not isinstance(queue, int) or isinstance(queue, bool) or queue < 0:
                raise RemoteProtocolError("queue must be a non-negative int")
            self.state = ClientState.STREAMING
            return Accepted(queue)
        if kind == "piece":
            if self.state is not ClientState.STREAMING:
                raise RemoteProtocolError("piece before accepted")
            text = msg.get("text")
            if not isinstance(text, str) or len(text) > self.limits.max_piece_chars:
                raise RemoteProtocolError("piece text missing or too long")
            if self.received_chars + len(text) > self.limits.max_text_chars:
                raise RemoteProtocolError("answer longer than the limit")
            self.received_chars += len(text)
            return Piece(text)
        if kind == "done":
            if self.state is not ClientState.STREAMING:
                raise RemoteProtocolError("done before accepted")
            result = codec.decode_done(msg, self.limits)
            self.state = ClientState.DONE
            return Completed(result)
        if kind == "error":
            frame = codec.decode_error(msg)
            self.state = ClientState.FAILED
            model, limit, scope = self.request.model, frame.limit, frame.scope
            error = codec.error_from(frame.code, frame.message, model, limit=limit, scope=scope)
            return Failed(error)
        raise RemoteProtocolError(f"unknown frame type {kind!r}")


class ServerState(enum.Enum):
    AWAIT_REQUEST = "await_request"
    QUEUED = "queued"
    RUNNING = "running"
    CLOSED = "closed"


class InferServerMachine:
    """The serving side of one exchange: validates the request, orders our answers."""

    def __init__(self, limits: InferLimits | None = None) -> None:
        self.limits = limits or InferLimits()
        self.state = ServerState.AWAIT_REQUEST
        self.request: InferRequest | None = None
        self.request_id = 0
        self.sent_chars = 0

    def receive_request(self, msg: dict[str, Any]) -> InferRequest | dict[str, Any]:
        """The validated request, or the error frame to answer with (then we close).

        Oversized requests get ``too_large``; malformed ones raise
        :class:`RemoteProtocolError` after we tried to say ``bad_request``.
        """
        if self.state is not ServerState.AWAIT_REQUEST:
            raise RemoteProtocolError("only one request per stream")
        if msg.get("t") != "infer":
            raise RemoteProtocolError(f"expected an infer frame, got {msg.get('t')!r}")
        try:  # echo the id in an error frame even when the rest is broken
            self.request_id = codec.request_id(msg)
        except RemoteProtocolError:
            self.request_id = 0
        try:
            request = codec.decode_request(msg, self.limits)
        except OverflowError as exc:
            self.state = ServerState.CLOSED
            return codec.encode_error(self.request_id, "too_large", str(exc))
        self.request = request
        self.state = ServerState.QUEUED
        return request

    def reject(
        self, code: str, message: str, *, limit: str = "", scope: str = ""
    ) -> dict[str, Any]:
        """Refuse before running (``busy``, ``unknown_model``)."""
        if self.state is not ServerState.QUEUED:
            raise LocalProtocolError(f"cannot reject in state {self.state.value}")
        self.state = ServerState.CLOSED
        return codec.encode_error(self.request_id, code, message, limit=limit, scope=scope)

    def accept(self, queue: int) -> dict[str, Any]:
        if self.state is not ServerState.QUEUED:
            raise LocalProtocolError(f"cannot accept in state {self.state.value}")
        self.state = ServerState.RUNNING
        return codec.encode_accepted(self.request_id, queue)

    def piece(self, text: str) -> list[dict[str, Any]]:
        """Frames for a piece of text, split so no frame exceeds the piece limit."""
        if self.state is not ServerState.RUNNING:
            raise LocalProtocolError(f"cannot stream in state {self.state.value}")
        self.sent_chars += len(text)
        step = self.limits.max_piece_chars
        return [
            codec.encode_piece(self.request_id, text[i : i + step])
            for i in range(0, len(text), step)
        ]

    def done(self, result: InferResult) -> dict[str, Any]:
        if self.state is not ServerState.RUNNING:
            raise LocalProtocolError(f"cannot finish in state {self.state.value}")
        self.state = ServerState.CLOSED
        if len(result.text) > self.limits.max_text_chars:
            result = InferResult(
                result.text[: self.limits.max_text_chars],
                result.prompt_tokens,
                result.completion_tokens,
                result.ttft_s,
                result.tok_per_s,
                "length",
                result.provider,
            )
        return codec.encode_done(self.request_id, result)

    def fail(self, code: str, message: str, *, limit: str = "", scope: str = "") -> dict[str, Any]:
        """The error frame ending the exchange, in any state but closed."""
        if self.state is ServerState.CLOSED:
            raise LocalProtocolError("exchange already closed")
        self.state = ServerState.CLOSED
        return codec.encode_error(self.request_id, code, message, limit=limit, scope=scope)


class Admission:
    """Queue slots (running or waiting requests) charged to the calling peer id, its
    source address and the total; at most ``max_active`` of them run at once.

    A refusal is :class:`~p2pedge.errors.Busy` with ``limit="infer.queue_slots"`` and the
    scope (peer, source or total) that ran out.
    """

    def __init__(self, limits: InferLimits | None = None) -> None:
        limits = limits or InferLimits()
        self.max_active = limits.max_active
        self.quota = Quota(
            QUEUE_SLOTS, Limit(limits.slots_per_peer, limits.slots_per_source, limits.slots_total)
        )

    @property
    def admitted(self) -> int:
        """Requests running or waiting, all peers together."""
        return self.quota.held()

    def admit(self, peer: str, source: str) -> tuple[Grant, int]:
        """A slot and the queue position it starts at (0 = runs now), or ``Busy``."""
        grant = self.quota.acquire(peer, source)
        return grant, max(0, self.quota.held() - self.max_active)

    def release(self, grant: Grant) -> None:
        self.quota.release(grant)
