"""Quotas by cost: what one peer, one source address and everyone together may hold.

A server charges each peer-triggered cost (bytes queued for it, sessions, KV bytes, queue
slots) to three accounts at once: the peer id, the peer's source address and the total.
Keying by source address as well as by peer id means minting new peer ids does not
multiply what one machine gets. Refusals are :class:`~p2pedge.errors.Busy` naming the
limit and the scope that ran out. Pure and synchronous (stdlib only): handlers acquire
before they allocate and release when the cost is gone.

:class:`RateLimit` is the time-based sibling: a token bucket per key that takes ``now``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from p2pedge.errors import Busy, LocalProtocolError


@dataclass(frozen=True)
class Limit:
    """Caps on one cost: per peer id, per source address, and for the whole server."""

    per_peer: int
    per_source: int
    total: int

    def __post_init__(self) -> None:
        if min(self.per_peer, self.per_source, self.total) < 0:
            raise LocalProtocolError(f"limits must be non-negative: {self}")


@dataclass(frozen=True)
class Grant:
    """What :meth:`Quota.acquire` charged; hand it back to :meth:`Quota.release`."""

    peer: str
    source: str
    cost: int


@dataclass
class Quota:
    """One named cost, charged to peer, source address and total accounts."""

    name: str
    limit: Limit
    _peers: dict[str, int] = field(default_factory=dict, repr=False)
    _sources: dict[str, int] = field(default_factory=dict, repr=False)
    _total: int = 0

    def acquire(self, peer: str, source: str, cost: int = 1) -> Grant:
        """Charge ``cost`` or raise :class:`Busy` naming the exhausted scope."""
        if cost < 0:
            raise LocalProtocolError(f"negative cost {cost}")
        checks = (
            ("peer", self._peers.get(peer, 0), self.limit.per_peer),
            ("source", self._sources.get(source, 0), self.limit.per_source),
            ("total", self._total, self.limit.total),
        )
        for scope, held, cap in checks:
            if held + cost > cap:
                raise Busy(
                    f"{self.name}: {scope} limit {cap} reached ({held} held, {cost} asked)",
                    limit=self.name,
                    scope=scope,
                )
        self._peers[peer] = self._peers.get(peer, 0) + cost
        self._sources[source] = self._sources.get(source, 0) + cost
        self._total += cost
        return Grant(peer, source, cost)

    def release(self, grant: Grant) -> None:
        for book, key in ((self._peers, grant.peer), (self._sources, grant.source)):
            left = book.get(key, 0) - grant.cost
            if left < 0:
                raise LocalProtocolError(f"{self.name}: released more than held by {key}")
            if left:
                book[key] = left
            else:
                del book[key]
        self._total -= grant.cost

    @contextmanager
    def hold(self, peer: str, source: str, cost: int = 1) -> Iterator[Grant]:
        """``acquire`` for the duration of a ``with`` block."""
        grant = self.acquire(peer, source, cost)
        try:
            yield grant
        finally:
            self.release(grant)

    def held(self, *, peer: str | None = None, source: str | None = None) -> int:
        """What ``peer`` (or ``source``) holds now; the total when neither is given."""
        if peer is not None:
            return self._peers.get(peer, 0)
        if source is not None:
            return self._sources.get(source, 0)
        return self._total


@dataclass
class RateLimit:
    """A token bucket per key: ``burst`` at once, refilled at ``rate`` per second.

    Keys are evicted when full again, so idle keys cost nothing; ``max_keys`` bounds the
    table when many keys are active at once (a refusal, never an eviction of the busy).
    """

    name: str
    rate: float
    burst: float
    max_keys: int = 4096
    _buckets: dict[str, tuple[float, float]] = field(default_factory=dict, repr=False)

    def take(self, key: str, now: float, cost: float = 1.0) -> None:
        """Spend ``cost`` tokens of ``key`` at time ``now`` or raise :class:`Busy`."""
        tokens, last = self._buckets.get(key, (self.burst, now))
        tokens = min(self.burst, tokens + max(0.0, now - last) * self.rate)
        if tokens < cost:
            self._buckets[key] = (tokens, now)
            raise Busy(f"{self.name}: rate limit for {key}", limit=self.name, scope="peer")
        if key not in self._buckets and len(self._buckets) >= self.max_keys:
            self._prune(now)
            if len(self._buckets) >= self.max_keys:
                raise Busy(f"{self.name}: too many active keys", limit=self.name, scope="total")
        self._buckets[key] = (tokens - cost, now)

    def _prune(self, now: float) -> None:
        full = [
            key
            for key, (tokens, last) in self._buckets.items()
            if tokens + (now - last) * self.rate >= self.burst
        ]
        for key in full:
            del self._buckets[key]
