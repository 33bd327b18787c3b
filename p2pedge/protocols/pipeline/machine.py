"""Sans-IO server side of the pipeline protocol: sessions, KV budget, idle expiry.

One machine per stream; the :class:`KvBudget` and the :class:`PipelineQuotas` are shared
by every stream of a server, so an open past the budget or past one peer's (or one source
address's) share is refused without touching other sessions. Every session
change goes through :data:`TRANSITIONS` (the single table); validation that does not
change state (shapes, dtypes, positions) happens before the table is consulted.
Nothing here awaits: callers pass ``now`` and carry out the returned actions.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from p2pedge.errors import Busy, LocalProtocolError
from p2pedge.ids import LayerRange
from p2pedge.protocols.pipeline import codec
from p2pedge.protocols.pipeline.actions import Action, Allocate, Release, Run, Send
from p2pedge.protocols.pipeline.codec import Close, Closed, Error, Open, Opened, Output, Step
from p2pedge.protocols.pipeline.limits import (
    DEFAULT_MAX_STEP_TOKENS,
    PipelineQuotas,
    refusal,
)
from p2pedge.quota import Grant
from p2pedge.wire.tensors import ALLOWED_DTYPES

DEFAULT_IDLE_TIMEOUT = 60.0
# A session no step has reached yet waits longer: downstream hops are opened with the
# route, then sit while hop 0 computes the prompt, which on a slow machine takes minutes.
# Stepping once a minute keeps any session alive anyway, so this lends a client nothing.
DEFAULT_FIRST_STEP_TIMEOUT = 600.0
DEFAULT_MAX_SESSIONS = 64


class State(enum.Enum):
    ABSENT = "absent"
    OPENING = "opening"
    OPEN = "open"
    BUSY = "busy"
    CLOSED = "closed"
    EXPIRED = "expired"


class Event(enum.Enum):
    OPEN = "open"
    READY = "ready"  # the executor finished an open or a step
    FAIL = "fail"  # the executor failed an open or a step
    STEP = "step"
    CLOSE = "close"
    EXPIRE = "expire"


# (state, event) -> next state, or the error code answered to the request.
TRANSITIONS: dict[tuple[State, Event], State | str] = {
    (State.ABSENT, Event.OPEN): State.OPENING,
    (State.ABSENT, Event.STEP): codec.E_UNKNOWN_SESSION,
    (State.ABSENT, Event.CLOSE): codec.E_UNKNOWN_SESSION,
    (State.OPENING, Event.READY): State.OPEN,
    (State.OPENING, Event.FAIL): State.CLOSED,
    (State.OPENING, Event.STEP): codec.E_BUSY,
    (State.OPENING, Event.CLOSE): codec.E_BUSY,
    (State.OPEN, Event.STEP): State.BUSY,
    (State.OPEN, Event.CLOSE): State.CLOSED,
    (State.OPEN, Event.EXPIRE): State.EXPIRED,
    (State.BUSY, Event.READY): State.OPEN,
    (State.BUSY, Event.FAIL): State.CLOSED,
    (State.BUSY, Event.STEP): codec.E_BUSY,
    (State.BUSY, Event.CLOSE): codec.E_BUSY,
    (State.CLOSED, Event.STEP): codec.E_CLOSED,
    (State.CLOSED, Event.CLOSE): codec.E_CLOSED,
    (State.EXPIRED, Event.STEP): codec.E_EXPIRED,
    (State.EXPIRED, Event.CLOSE): codec.E_EXPIRED,
}
LIVE = frozenset({State.OPENING, State.OPEN, State.BUSY})


@dataclass(frozen=True)
class ShardSpec:
    """What the server knows about one shard it serves (read from the shard's graph)."""

    first: bool
    last: bool
    hidden: int
    vocab: int
    kv_bytes_per_token: int
    max_length: int = 4096


class KvBudget:
    """Bytes of KV cache a server may hand out, shared by all its streams."""

    def __init__(self, limit_bytes: int) -> None:
        if limit_bytes < 0:
            raise LocalProtocolError("budget must be >= 0")
        self.limit = limit_bytes
        self.used = 0

    def reserve(self, n: int) -> bool:
        if self.used + n > self.limit:
            return False
        self.used += n
        return True

    def release(self, n: int) -> None:
        if n > self.used:
            raise LocalProtocolError(f"releasing {n} bytes but only {self.used} reserved")
        self.used -= n


@dataclass
class _Session:
    model: str
    layers: LayerRange
    spec: ShardSpec
    max_length: int
    dtype: str
    kv_bytes: int
    state: State
    last_active: float
    length: int = 0
    pending: tuple[int, int] | None = None  # (rid, end position) of the request in flight
    started: int = 0  # where the step in flight starts
    pushed: Step | None = None  # the step in flight, when another server pushed it
    joined: int | None = None  # a relayed request answered by that pushed step's result
    floor: int = 0  # pushed steps from an older ring epoch are refused (see codec.Step)
    grants: tuple[Grant, Grant] | None = None  # what the session holds of the quotas


@dataclass
class ServerMachine:
    """One stream's sessions. ``catalog`` maps ``(model, range)`` to what is served;
    ``quotas`` (when given) charges each session to ``peer`` and ``source``."""

    catalog: Mapping[tuple[str, LayerRange], ShardSpec]
    budget: KvBudget
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT
    first_step_timeout: float = DEFAULT_FIRST_STEP_TIMEOUT
    max_step_tokens: int = DEFAULT_MAX_STEP_TOKENS
    max_sessions: int = DEFAULT_MAX_SESSIONS
    quotas: PipelineQuotas | None = None
    peer: str = ""
    source: str = ""
    sessions: dict[int, _Session] = field(default_factory=dict)
    _next_id: int = 1

    # --- requests from the peer ------------------------------------------------------

    def receive(self, msg: codec.Message, now: float) -> list[Action]:
        match msg:
            case Open():
                return self._open(msg, now)
            case Step():
                return self._step(msg, now)
            case Close():
                return self._close(msg, now)
        return [Send(Error(getattr(msg, "rid", 0), codec.E_BAD_REQUEST, "not a request"))]

    def state_of(self, session: int) -> State:
        s = self.sessions.get(session)
        return State.ABSENT if s is None else s.state

    def _move(self, session: int, event: Event) -> State | str:
        outcome = TRANSITIONS.get((self.state_of(session), event))
        if outcome is None:
            raise LocalProtocolError(f"{event} not allowed in {self.state_of(session)}")
        if isinstance(outcome, State):
            s = self.sessions[session]
            if s.state in LIVE and outcome not in LIVE:
                self._free(s)
            s.state = outcome
        return outcome

    def _free(self, s: _Session) -> None:
        self.budget.release(s.kv_bytes)
        if s.grants is not None and self.quotas is not None:
            self.quotas.close(s.grants)
        s.grants = None

    def _open(self, msg: Open, now: float) -> list[Action]:
        def refuse(code: str, text: str) -> list[Action]:
            return [Send(Error(msg.rid, code, text))]

        try:
            layers = LayerRange(msg.start, msg.end)
        except ValueError as exc:
            return refuse(codec.E_BAD_REQUEST, str(exc))
        spec = self.catalog.get((msg.model, layers))
        if spec is None:
            return refuse(codec.E_UNSUPPORTED, f"{msg.model} blocks {layers} not served here")
        if msg.max_length > spec.max_length:
            return refuse(codec.E_BAD_REQUEST, f"max_length {msg.max_length} > {spec.max_length}")
        if sum(s.state in LIVE for s in self.sessions.values()) >= self.max_sessions:
            return refuse(codec.E_BUDGET, f"at most {self.max_sessions} sessions per stream")
        kv_bytes = msg.max_length * spec.kv_bytes_per_token
        grants = None
        if self.quotas is not None:
            try:
                grants = self.quotas.open(self.peer, self.source, kv_bytes)
            except Busy as busy:
                return [Send(refusal(msg.rid, busy))]
        if not self.budget.reserve(kv_bytes):
            if grants is not None and self.quotas is not None:
                self.quotas.close(grants)
            free = self.budget.limit - self.budget.used
            return refuse(codec.E_BUDGET, f"KV cache needs {kv_bytes} bytes, {free} free")
        session = self._next_id
        self._next_id += 1
        self.sessions[session] = _Session(
            msg.model, layers, spec, msg.max_length, msg.dtype, kv_bytes, State.ABSENT, now
        )
        self.sessions[session].grants = grants
        self._move(session, Event.OPEN)
        self.sessions[session].pending = (msg.rid, 0)
        return [Allocate(session, msg.model, layers, msg.max_length, msg.next)]

    def _check_step(self, s: _Session, msg: Step) -> str | None:
        x, first, shape = msg.x, s.spec.first, msg.x.shape
        n = shape[1] if len(shape) >= 2 else 0
        if first:
            if x.dtype != ALLOWED_DTYPES["int64"] or len(shape) != 2 or shape[0] != 1:
                return f"first shard takes int64 token ids [1, n], got {x.dtype} {list(shape)}"
            ids = x.ravel().tolist()  # Python min/max: numpy's reductions are slow cold
            if n and (min(ids) < 0 or max(ids) >= s.spec.vocab):
                return f"token id outside [0, {s.spec.vocab})"
        elif x.dtype != ALLOWED_DTYPES[s.dtype] or shape != (1, n, s.spec.hidden):
            want = f"{s.dtype} [1, n, {s.spec.hidden}]"
            return f"hidden states must be {want}, got {x.dtype} {list(x.shape)}"
        if not 1 <= n <= self.max_step_tokens:
            return f"step of {n} tokens outside [1, {self.max_step_tokens}]"
        if msg.start > s.length:
            return f"start {msg.start} is past the {s.length} cached positions"
        if msg.start + n > s.max_length:
            return f"positions up to {msg.start + n} exceed max_length {s.max_length}"
        if msg.ring is not None and s.spec.last and msg.top_k < 1:
            return "a ring's last shard picks the next token: top_k must be >= 1"
        return None

    def _step(self, msg: Step, now: float) -> list[Action]:
        s = self.sessions.get(msg.session)
        if s is not None and msg.rid != 0:
            s.floor = max(s.floor, msg.epoch)
        if s is not None and self._joins_pushed(s, msg):
            s.joined = msg.rid
            return []  # answered when the pushed copy finishes (see step_done)
        if s is not None and s.state is State.OPEN:
            problem = self._check_step(s, msg)
            if problem is not None:
                return [Send(Error(msg.rid, codec.E_BAD_REQUEST, problem))]
        outcome = self._move(msg.session, Event.STEP)
        if isinstance(outcome, str):
            return [
                Send(
                    Error(
                        msg.rid,
                        outcome,
                        f"session {msg.session} is {self.state_of(msg.session).value}",
                    )
                )
            ]
        assert s is not None
        s.last_active = now
        s.pending = (msg.rid, msg.start + int(msg.x.shape[1]))
        s.started = msg.start
        s.pushed = msg if msg.rid == 0 else None
        top_k = msg.top_k if s.spec.last else 0
        fwd = () if s.spec.last else msg.fwd
        ring, epoch = msg.ring, msg.epoch
        return [
            Run(
                msg.session,
                msg.rid,
                msg.start,
                msg.x,
                s.spec.last,
                top_k,
                fwd,
                ring,
                epoch,
                self.peer,
                self.source,
            )
        ]

    def _close(self, msg: Close, now: float) -> list[Action]:
        outcome = self._move(msg.session, Event.CLOSE)
        if isinstance(outcome, str):
            return [
                Send(
                    Error(
                        msg.rid,
                        outcome,
                        f"session {msg.session} is {self.state_of(msg.session).value}",
                    )
                )
            ]
        return [Release(msg.session), Send(Closed(msg.rid, msg.session))]

    @staticmethod
    def _joins_pushed(s: _Session, msg: Step) -> bool:
        """A relayed step that is the very step a push is running now: the client gave
        up waiting for the pushed output and relayed the same input itself. Answering
        it with ``busy`` would read as a failed hop; it gets the pushed step's result."""
        p = s.pushed
        return (
            s.state is State.BUSY
            and p is not None
            and s.joined is None
            and msg.rid != 0
            and (msg.start, msg.top_k) == (p.start, p.top_k)
            and msg.x.shape == p.x.shape
            and msg.x.dtype == p.x.dtype
            and np.array_equal(msg.x, p.x)
        )

    def refuse_push(self, session: int, start: int, rid: int, epoch: int = 0) -> Error | None:
        """The answer to a pushed step that must not run, or None if it may.

        A push only ever carries the next new position of an idle session, from a ring
        epoch the client has not moved past. Anything else is a copy that came late, after
        the client gave up waiting and relayed that step itself: run, it would find the
        session busy (and the owner would read the error as a failed hop) or rewind the
        cache under the client's later steps. Refusing it to the pusher leaves the owner's
        session as the client drives it.
        """
        s = self.sessions.get(session)
        if s is None or s.state is not State.OPEN:
            code = codec.E_BUSY if s is not None and s.state is State.BUSY else codec.E_CLOSED
            return Error(rid, code, f"session {session} is {self.state_of(session).value}")
        if start != s.length:
            return Error(rid, codec.E_BAD_REQUEST, f"pushed start {start}, next is {s.length}")
        if epoch < s.floor:
            return Error(rid, codec.E_BAD_REQUEST, f"pushed from epoch {epoch}, now {s.floor}")
        return None

    # --- results from the executor ---------------------------------------------------

    def _finish(self, session: int, now: float) -> tuple[_Session, int, int]:
        s = self.sessions.get(session)
        if s is None or s.pending is None:
            raise LocalProtocolError(f"session {session} has nothing in flight")
        rid, end = s.pending
        s.pending, s.pushed = None, None
        s.last_active = now
        return s, rid, end

    @staticmethod
    def _answer_joined(s: _Session, reply: Output | Error) -> list[Action]:
        """``reply`` to the request in flight, and a copy to a joined relayed request."""
        joined, s.joined = s.joined, None
        if joined is None:
            return [Send(reply)]
        if isinstance(reply, Output):  # a reply to a request, not a pushed step's output
            return [Send(reply), Send(dataclasses.replace(reply, rid=joined, at=None))]
        return [Send(reply), Send(dataclasses.replace(reply, rid=joined))]

    def ready(self, session: int, now: float, key: bytes = b"") -> list[Action]:
        """The executor session exists (after :class:`Allocate`)."""
        s, rid, _ = self._finish(session, now)
        if s.state is not State.OPENING:
            raise LocalProtocolError(f"session {session} is not opening")
        self._move(session, Event.READY)
        return [Send(Opened(rid, session, s.kv_bytes, key))]

    def step_done(
        self,
        session: int,
        y: npt.NDArray[Any],
        now: float,
        ids: npt.NDArray[Any] | None = None,
        token: int | None = None,
        signed: tuple[bytes, bytes] = (b"", b""),
    ) -> list[Action]:
        """The executor's result: hidden states, logits, or top-k logits with their ``ids``
        (and, from a ring's last shard, the ``token`` it picked); ``signed`` is the
        signature over it and the input chain it binds (see ``attest.py``), if any."""
        s, rid, end = self._finish(session, now)
        if s.state is not State.BUSY:
            raise LocalProtocolError(f"session {session} is not running a step")
        self._move(session, Event.READY)
        s.length = end
        at = s.started if rid == 0 else None  # a pushed step's output says where it starts
        sig, chain = signed
        if ids is not None:
            out = Output(rid, session, y, ids, s.spec.vocab, token, at, sig, chain)
            return self._answer_joined(s, out)
        y = self.wire_output(session, y)
        return self._answer_joined(s, Output(rid, session, y, at=at, sig=sig, chain=chain))

    def wire_output(self, session: int, y: npt.NDArray[Any]) -> npt.NDArray[Any]:
        """A step's output as it goes on the wire (hidden states in the session's dtype)."""
        s = self.sessions[session]
        return y if s.spec.last else codec.as_wire(y, s.dtype)

    def refused(self, session: int, busy: Busy, now: float) -> list[Action]:
        """A step was refused before it ran (a queue's quota): the session is idle again,
        unchanged, and the request is answered with the refusal."""
        s, rid, _ = self._finish(session, now)
        if s.state is not State.BUSY:
            raise LocalProtocolError(f"session {session} is not running a step")
        self._move(session, Event.READY)
        return self._answer_joined(s, refusal(rid, busy))

    def failed(self, session: int, reason: str, now: float) -> list[Action]:
        """The executor failed an open or a step: the session is closed and freed."""
        s, rid, _ = self._finish(session, now)
        was_busy = s.state is State.BUSY
        self._move(session, Event.FAIL)
        release: list[Action] = [Release(session)] if was_busy else []
        error = Error(rid, codec.E_INTERNAL, reason[: codec.MAX_TEXT])
        return [*release, *self._answer_joined(s, error)]

    # --- time and teardown -----------------------------------------------------------

    def _expires_at(self, s: _Session) -> float:
        """An open session's end: ``idle_timeout`` after its last step or, before its
        first step, ``first_step_timeout`` after it opened."""
        return s.last_active + (self.idle_timeout if s.length else self.first_step_timeout)

    def next_deadline(self) -> float | None:
        ends = [self._expires_at(s) for s in self.sessions.values() if s.state is State.OPEN]
        return min(ends) if ends else None

    def tick(self, now: float) -> list[Action]:
        actions: list[Action] = []
        for sid, s in self.sessions.items():
            if s.state is State.OPEN and now >= self._expires_at(s):
                self._move(sid, Event.EXPIRE)
                actions.append(Release(sid))
        return actions

    def stream_ended(self) -> list[Action]:
        """The peer went away: free every live session (in-flight work is abandoned)."""
        actions: list[Action] = []
        for sid, s in self.sessions.items():
            if s.state in LIVE:
                had_executor = s.state is not State.OPENING
                self._free(s)
                s.state, s.pending, s.pushed, s.joined = State.CLOSED, None, None, None
                if had_executor:
                    actions.append(Release(sid))
        return actions
