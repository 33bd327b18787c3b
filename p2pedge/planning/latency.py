"""Measured round-trip times per peer, for route choice. Pure: callers pass ``now``.

Route choice weighs each hop by RTT plus estimated compute (``planning.routes``). RTTs
come from pings; a peer that did not answer within the timeout is recorded at that
timeout, so a route avoids it without the peer vanishing from the options (its card may
still be right). Entries go stale after ``ttl_s`` and are measured again.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

DEFAULT_RTT_TTL_S = 60.0
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
