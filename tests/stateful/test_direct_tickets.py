"""Hypothesis drives the direct lane's ticket book against a plain model of it."""

from __future__ import annotations

import itertools

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from p2pedge.protocols.direct.machine import TicketBook

PEERS = ("a", "b", "c")
TTL, PER_PEER, TOTAL = 5.0, 3, 6


class TicketBookMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        counter = itertools.count()
        self.book = TicketBook(
            ttl=TTL,
            per_peer=PER_PEER,
            total=TOTAL,
            random_bytes=lambda n: next(counter).to_bytes(n, "big"),
        )
        self.now = 0.0
        self.live: dict[bytes, tuple[str, float]] = {}  # ticket -> (peer, expires)
        self.spent: set[bytes] = set()

    def _expire(self) -> None:
        for ticket in [t for t, (_, exp) in self.live.items() if exp <= self.now]:
            del self.live[ticket]
            self.spent.add(ticket)

    @rule(peer=st.sampled_from(PEERS))
    def issue(self, peer: str) -> None:
        self._expire()
        mine = sum(1 for p, _ in self.live.values() if p == peer)
        issued = self.book.issue(peer, "/x", self.now)
        if len(self.live) >= TOTAL or mine >= PER_PEER:
            assert isinstance(issued, str)
            return
        assert not isinstance(issued, str)
        ticket, key = issued
        assert ticket not in self.live and ticket not in self.spent and len(key) == 32
        self.live[ticket] = (peer, self.now + TTL)

    @rule(data=st.data())
    def redeem(self, data: st.DataObject) -> None:
        pool = sorted(self.live) + sorted(self.spent) + [b"\xff" * 16]
        ticket = data.draw(st.sampled_from(pool))
        grant = self.book.redeem(ticket, self.now)
        entry = self.live.pop(ticket, None)
        self.spent.add(ticket)
        if entry is None or entry[1] <= self.now:
            assert grant is None
        else:
            assert grant is not None and grant.peer_id == entry[0]

    @rule(dt=st.floats(min_value=0.0, max_value=4.0))
    def wait(self, dt: float) -> None:
        self.now += dt

    @invariant()
    def bounded(self) -> None:
        assert len(self.book) <= TOTAL
        for peer in PEERS:
            assert self.book.outstanding(peer) <= PER_PEER


TestTicketBook = TicketBookMachine.TestCase
TestTicketBook.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)
