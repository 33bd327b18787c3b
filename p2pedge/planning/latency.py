"""Measured round-trip times per peer, and measured decode-step times per hop, for route
choice. Pure: callers pass ``now``.

Route choice weighs each hop by RTT plus estimated compute (``planning.routes``). RTTs
come from pings; a peer that did not answer within the timeout is recorded at that
timeout, so a route avoids it without the peer vanishing from the options (its card may
still be right). Entries go stale after ``ttl_s`` and are measured again.

Once a client has decoded through a server, it knows better than any card: the time a
decode step took there, as the client saw it (network, queueing behind other sessions,
compute under the server's real load). :class:`StepTimes` keeps those per server, model
and block range; route choice prefers them to its estimate while they are fresh.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

DEFAULT_RTT_TTL_S = 60.0
DEFAULT_STEP_TTL_S = 300.0
RTT_SMOOTHING = 0.5  # weight of a new measurement against the previous fresh one


@dataclass
class RttTable:
    ttl_s: float = DEFAULT_RTT_TTL_S
    _entries: dict[str, tuple[float, float]] = field(default_factory=dict)  # rtt, when

    def record(self, peer: str, rtt_s: float, now: float) -> None:
        if rtt_s < 0:
            raise ValueError(f"negative round trip {rtt_s} for {peer}")
        previous = self.fresh(peer, now)
        if previous is not None:
            rtt_s = previous + RTT_SMOOTHING * (rtt_s - previous)
        self._entries[peer] = (rtt_s, now)

    def fresh(self, peer: str, now: float) -> float | None:
        """The peer's RTT if measured within ``ttl_s``, else None."""
        entry = self._entries.get(peer)
        if entry is None or now - entry[1] > self.ttl_s:
            return None
        return entry[0]

    def stale(self, peers: Iterable[str], now: float) -> list[str]:
        """Peers (in the order given, without repeats) that need measuring."""
        seen: set[str] = set()
        out = []
        for peer in peers:
            if peer not in seen and self.fresh(peer, now) is None:
                out.append(peer)
            seen.add(peer)
        return out

    def known(self, peers: Iterable[str], now: float) -> dict[str, float]:
        """Fresh RTTs of ``peers``; unmeasured ones are left out (route choice defaults)."""
        return {p: rtt for p in peers if (rtt := self.fresh(p, now)) is not None}

    def forget_stale(self, now: float) -> None:
        self._entries = {p: e for p, e in self._entries.items() if now - e[1] <= self.ttl_s}


@dataclass
class StepTimes:
    """Seconds per decode step seen through ``(peer, model, blocks)``, smoothed, fresh for
    ``ttl_s``."""

    ttl_s: float = DEFAULT_STEP_TTL_S
    _table: RttTable = field(init=False)

    def __post_init__(self) -> None:
        self._table = RttTable(self.ttl_s)

    @staticmethod
    def _key(peer: str, model: str, start: int, end: int) -> str:
        return f"{peer}/{model}/{start}-{end}"

    def record(
        self, peer: str, model: str, start: int, end: int, seconds: float, now: float
    ) -> None:
        self._table.forget_stale(now)
        self._table.record(self._key(peer, model, start, end), seconds, now)

    def fresh(self, peer: str, model: str, start: int, end: int, now: float) -> float | None:
        return self._table.fresh(self._key(peer, model, start, end), now)
