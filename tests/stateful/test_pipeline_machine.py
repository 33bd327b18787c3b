"""Hypothesis drives the pipeline server machine against a plain model of its sessions,
its KV budget and its quotas (sessions and KV bytes per peer, steps refused by a queue)."""

from __future__ import annotations

import numpy as np
from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    invariant,
    multiple,
    rule,
)

from p2pedge.errors import Busy
from p2pedge.ids import LayerRange
from p2pedge.protocols.pipeline import codec
from p2pedge.protocols.pipeline.actions import Allocate, Release, Run, Send
from p2pedge.protocols.pipeline.limits import PipelineLimits, PipelineQuotas
from p2pedge.protocols.pipeline.machine import (
    LIVE,
    TRANSITIONS,
    Event,
    KvBudget,
    ServerMachine,
    ShardSpec,
    State,
)
from p2pedge.quota import Limit

HIDDEN, VOCAB, PER_TOKEN = 8, 50, 100
CATALOG = {
    ("m", LayerRange(0, 2)): ShardSpec(True, False, HIDDEN, VOCAB, PER_TOKEN, max_length=64),
    ("m", LayerRange(2, 4)): ShardSpec(False, True, HIDDEN, VOCAB, PER_TOKEN, max_length=64),
}
IDLE = 10.0
FIRST_STEP = 40.0
SESSIONS_PER_PEER, KV_SHARE = 4, 0.6
LIMITS = PipelineLimits(
    sessions=Limit(SESSIONS_PER_PEER, SESSIONS_PER_PEER, 100), kv_peer_share=KV_SHARE
)


class PipelineMachineTest(RuleBasedStateMachine):
    sessions = Bundle("sessions")

    def __init__(self) -> None:
        super().__init__()
        self.budget = KvBudget(PER_TOKEN * 100)
        self.quotas = PipelineQuotas(LIMITS, self.budget.limit)
        self.m = ServerMachine(
            CATALOG,
            self.budget,
            idle_timeout=IDLE,
            first_step_timeout=FIRST_STEP,
            max_step_tokens=8,
            quotas=self.quotas,
            peer="p",
            source="10.0.0.1",
        )
        self.now = 0.0
        self.rid = 0
        self.expected: dict[int, State] = {}
        self.lengths: dict[int, int] = {}
        self.first: dict[int, bool] = {}
        self.reserved: dict[int, int] = {}
        self.pending: dict[int, int] = {}
        self.active: dict[int, float] = {}
        self.in_flight: dict[int, tuple[int, int, np.ndarray]] = {}  # rid, start, x
        self.joined: dict[int, int] = {}
        self.dtypes: dict[int, str] = {}
        self.floors: dict[int, int] = {}  # ring epoch a push must be from, at least

    def _rid(self) -> int:
        self.rid += 1
        return self.rid

    def _one_reply(self, actions: list[object], rid: int) -> codec.Reply | None:
        sends = [a.reply for a in actions if isinstance(a, Send)]
        work = [a for a in actions if isinstance(a, Allocate | Run)]
        assert len(sends) + len(work) == 1, actions
        if sends:
            assert sends[0].rid == rid
            return sends[0]
        return None

    @rule(
        target=sessions,
        start=st.sampled_from([0, 2, 1]),
        max_length=st.one_of(st.integers(1, 80), st.integers(1, 4)),  # small: many sessions
        dtype=st.sampled_from(codec.WIRE_DTYPES),
    )
    def open(self, start: int, max_length: int, dtype: str) -> object:
        rid = self._rid()
        used = self.budget.used
        actions = self.m.receive(
            codec.Open(rid, "m", start, start + 2, max_length, dtype), self.now
        )
        reply = self._one_reply(actions, rid)
        served = start in (0, 2)
        fits = max_length <= 64 and used + max_length * PER_TOKEN <= self.budget.limit
        live = sum(st_ in LIVE for st_ in self.expected.values())
        kv_share = used + max_length * PER_TOKEN <= int(self.budget.limit * KV_SHARE)
        quota = live < SESSIONS_PER_PEER and kv_share
        if reply is not None:
            assert isinstance(reply, codec.Error)
            assert not (served and fits and quota)
            if served and max_length <= 64 and not quota:
                assert reply.code == codec.E_BUDGET and reply.scope == "peer"
                want = "pipeline.sessions" if live >= SESSIONS_PER_PEER else "pipeline.kv_bytes"
                assert reply.limit == want
                event(f"an open was refused by {want}")
            return multiple()
        assert served and fits and quota
        (alloc,) = actions
        assert isinstance(alloc, Allocate)
        self.expected[alloc.session] = State.OPENING
        self.lengths[alloc.session] = 0
        self.first[alloc.session] = start == 0
        self.reserved[alloc.session] = max_length * PER_TOKEN
        self.dtypes[alloc.session] = dtype
        self.active[alloc.session] = self.now
        return alloc.session

    @rule(session=sessions, ok=st.booleans())
    def finish_open(self, session: int, ok: bool) -> None:
        if self.expected[session] is not State.OPENING:
            return
        if ok:
            (send,) = self.m.ready(session, self.now)
            assert isinstance(send, Send) and isinstance(send.reply, codec.Opened)
            self.expected[session] = State.OPEN
            self.active[session] = self.now
        else:
            (send,) = self.m.failed(session, "load failed", self.now)
            assert isinstance(send, Send) and send.reply.code == codec.E_INTERNAL
            self.expected[session] = State.CLOSED

    @rule(
        session=st.one_of(sessions, st.integers(1000, 1010)),
        n=st.integers(0, 10),
        back=st.integers(0, 3),
        good_dtype=st.booleans(),
        epoch=st.integers(0, 3),
    )
    def step(self, session: int, n: int, back: int, good_dtype: bool, epoch: int) -> None:
        rid = self._rid()
        known = session in self.expected
        first = self.first.get(session, True)
        length = self.lengths.get(session, 0)
        start = max(length - back, 0) if back < 3 else length + 1
        if first:
            x = np.arange(n, dtype=np.int64 if good_dtype else np.int32)[None] % VOCAB
        else:
            x = np.zeros((1, n, HIDDEN), np.float32 if good_dtype else np.float64)
        actions = self.m.receive(codec.Step(rid, session, start, x, epoch=epoch), self.now)
        if known:  # the client's own step: pushes from older rings are stale now
            self.floors[session] = max(self.floors.get(session, 0), epoch)
        state = self.expected.get(session, State.ABSENT)
        if self._joins(session, start, x):
            assert actions == []  # answered with the pushed step's result
            self.joined[session] = rid
            return
        reply = self._one_reply(actions, rid)
        if reply is None:
            (run,) = actions
            assert isinstance(run, Run) and run.start == start
            assert state is State.OPEN and 1 <= n <= 8 and good_dtype and start <= length
            self.expected[session] = State.BUSY
            self.pending[session] = start + n
            self.in_flight[session] = (rid, start, x)
            return
        assert isinstance(reply, codec.Error)
        if state is State.OPEN:
            assert reply.code == codec.E_BAD_REQUEST or not known
        else:
            assert reply.code == TRANSITIONS[(state, Event.STEP)]

    def _joins(self, session: int, start: int, x: np.ndarray) -> bool:
        flight = self.in_flight.get(session)
        return (
            self.expected.get(session) is State.BUSY
            and flight is not None
            and flight[0] == 0
            and session not in self.joined
            and flight[1] == start
            and flight[2].shape == x.shape
            and flight[2].dtype == x.dtype
            and bool(np.array_equal(flight[2], x))
        )

    @rule(session=sessions, n=st.integers(1, 3), then_relay=st.booleans())
    def pushed_step(self, session: int, n: int, then_relay: bool) -> None:
        """Another server pushes the next positions (rid 0; the handler lets a push run
        only at the next new position of an idle session), maybe relayed right after."""
        start = self.lengths[session]
        if self.m.refuse_push(session, start, 9, self.floors.get(session, 0)) is not None:
            assert self.expected[session] is not State.OPEN
            return
        if start + n > self.reserved[session] // PER_TOKEN:
            return  # past max_length: refused like any step (the step rule covers it)
        if self.first[session]:
            x = (np.arange(n, dtype=np.int64)[None] + start) % VOCAB
        else:
            x = np.full((1, n, HIDDEN), float(start), self.dtypes[session])
        (run,) = self.m.receive(codec.Step(0, session, start, x), self.now)
        assert isinstance(run, Run) and run.rid == 0
        self.expected[session] = State.BUSY
        self.pending[session] = start + n
        self.in_flight[session] = (0, start, x)
        if then_relay:
            self.relay_the_pushed_step(session)

    @rule(session=sessions)
    def relay_again(self, session: int) -> None:
        self.relay_the_pushed_step(session)

    def relay_the_pushed_step(self, session: int) -> None:
        """The client relays the very step a push is running (its grace time ran out)."""
        flight = self.in_flight.get(session)
        if flight is None or self.expected[session] is not State.BUSY:
            return
        rid = self._rid()
        actions = self.m.receive(codec.Step(rid, session, flight[1], flight[2].copy()), self.now)
        if self._joins(session, flight[1], flight[2]):
            assert actions == []
            self.joined[session] = rid
            event("a relayed step joined the pushed step in flight")
        else:
            assert self._one_reply(actions, rid).code == codec.E_BUSY  # type: ignore[union-attr]

    @rule(session=sessions, ok=st.booleans())
    def finish_step(self, session: int, ok: bool) -> None:
        if self.expected[session] is not State.BUSY:
            return
        rid, start, _ = self.in_flight.pop(session)
        joined = self.joined.pop(session, None)
        want = [rid] if joined is None else [rid, joined]
        if ok:
            y = np.zeros((1, 1, HIDDEN), np.float32)
            sends = self.m.step_done(session, y, self.now)
            assert all(isinstance(a, Send) and isinstance(a.reply, codec.Output) for a in sends)
            assert [a.reply.rid for a in sends] == want  # type: ignore[union-attr]
            # a pushed step's output says where it starts; a reply to a request does not
            at = [a.reply.at for a in sends]  # type: ignore[union-attr]
            assert at == [start if rid == 0 else None, None][: len(want)]
            self.expected[session] = State.OPEN
            self.lengths[session] = self.pending.pop(session)
            self.active[session] = self.now
        else:
            actions = self.m.failed(session, "kernel error", self.now)
            assert isinstance(actions[0], Release) and actions[0].session == session
            errors = actions[1:]
            assert all(isinstance(a, Send) and a.reply.code == codec.E_INTERNAL for a in errors)
            assert [a.reply.rid for a in errors] == want  # type: ignore[union-attr]
            self.expected[session] = State.CLOSED
            self.pending.pop(session)

    @rule(session=sessions)
    def queue_refuses(self, session: int) -> None:
        """The step in flight was refused by the step queue before it ran: the session is
        idle again and unchanged, and the request (and a joined relay) gets the refusal."""
        if self.expected[session] is not State.BUSY:
            return
        rid, _, _ = self.in_flight.pop(session)
        joined = self.joined.pop(session, None)
        busy = Busy("full", limit="pipeline.queued_steps", scope="source")
        sends = self.m.refused(session, busy, self.now)
        assert all(isinstance(a, Send) and a.reply.code == codec.E_BUDGET for a in sends)
        replies = [a.reply for a in sends if isinstance(a, Send)]
        assert [r.rid for r in replies] == ([rid] if joined is None else [rid, joined])
        assert all(isinstance(r, codec.Error) and r.scope == "source" for r in replies)
        self.expected[session] = State.OPEN
        self.pending.pop(session)
        self.active[session] = self.now
        event("a queued step was refused" + (" with a joined relay" if joined else ""))

    @rule(
        session=st.one_of(sessions, st.integers(1000, 1010)),
        offset=st.integers(-2, 2),
        epoch=st.integers(0, 3),
    )
    def push_arrives(self, session: int, offset: int, epoch: int) -> None:
        """A pushed step may run only at the next new position of an idle session, from a
        ring epoch the client has not moved past; the check changes nothing."""
        start = self.lengths.get(session, 0) + offset
        refusal = self.m.refuse_push(session, start, 7, epoch)
        state = self.expected.get(session, State.ABSENT)
        if state is State.OPEN and offset == 0 and epoch >= self.floors.get(session, 0):
            assert refusal is None
            return
        assert refusal is not None and refusal.rid == 7
        if state is State.OPEN and offset == 0:
            event("a push from an abandoned ring epoch was refused")
        if state is State.BUSY:
            assert refusal.code == codec.E_BUSY
        elif state is State.OPEN:
            assert refusal.code == codec.E_BAD_REQUEST
        else:
            assert refusal.code == codec.E_CLOSED

    @rule(session=consumes(sessions))
    def close(self, session: int) -> None:
        rid = self._rid()
        state = self.expected[session]
        actions = self.m.receive(codec.Close(rid, session), self.now)
        if state is State.OPEN:
            assert isinstance(actions[0], Release)
            assert isinstance(actions[1], Send) and isinstance(actions[1].reply, codec.Closed)
            self.expected[session] = State.CLOSED
        else:
            (send,) = actions
            assert isinstance(send, Send) and send.reply.code == TRANSITIONS[(state, Event.CLOSE)]

    @rule(dt=st.floats(0, 15))
    def time_passes(self, dt: float) -> None:
        self.now += dt
        due = {
            sid
            for sid, state in self.expected.items()
            if state is State.OPEN
            and self.now - self.active[sid] >= (IDLE if self.lengths[sid] else FIRST_STEP)
        }
        deadline = self.m.next_deadline()
        released = {a.session for a in self.m.tick(self.now) if isinstance(a, Release)}
        assert released == due
        if due:
            assert deadline is not None and deadline <= self.now
        for sid in due:
            self.expected[sid] = State.EXPIRED

    @invariant()
    def states_agree(self) -> None:
        for sid, state in self.expected.items():
            assert self.m.state_of(sid) is state

    @invariant()
    def budget_is_exactly_the_live_reservations(self) -> None:
        live = sum(self.reserved[s] for s, st_ in self.expected.items() if st_ in LIVE)
        assert self.budget.used == live <= self.budget.limit

    @invariant()
    def quotas_hold_exactly_the_live_sessions(self) -> None:
        live = [s for s, st_ in self.expected.items() if st_ in LIVE]
        assert self.quotas.sessions.held(peer="p") == len(live) <= SESSIONS_PER_PEER
        assert self.quotas.kv_bytes.held(source="10.0.0.1") == self.budget.used

    def teardown(self) -> None:
        self.m.stream_ended()
        assert self.budget.used == 0
        assert self.quotas.sessions.held() == self.quotas.kv_bytes.held() == 0


TestPipelineMachine = PipelineMachineTest.TestCase
TestPipelineMachine.settings = settings(max_examples=100, stateful_step_count=40, deadline=None)
