"""Ticket book for the direct lane (sans-IO; every call takes ``now``).

The server hands out tickets over authenticated libp2p streams and redeems them when a
TCP hello arrives. Tickets are single-use and expire, and both the number per peer and
the total are bounded, so a peer asking for tickets it never uses cannot grow our memory.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass

from p2pedge.protocols.direct.codec import SECRET_BYTES, TICKET_BYTES
from p2pedge.quota import Limit

DEFAULT_TTL = 30.0
DEFAULT_PER_PEER = 16
DEFAULT_TOTAL = 1024
DEFAULT_HELLO_TIMEOUT = 2.0
DEFAULT_HANDSHAKES_PER_SOURCE = 8
DEFAULT_HANDSHAKES_TOTAL = 128


@dataclass(frozen=True)
class LaneLimits:
    """What strangers on the lane's TCP port may hold, and the tickets peers may ask for.

    ``handshakes_*`` count connections that have not yet authenticated, by source address
    and in total; ``hello_timeout`` is how long one may stay silent before it is closed.
    One address opening many silent connections then delays only its own handshakes.
    """

    hello_timeout: float = DEFAULT_HELLO_TIMEOUT
    handshakes_per_source: int = DEFAULT_HANDSHAKES_PER_SOURCE
    handshakes_total: int = DEFAULT_HANDSHAKES_TOTAL
    ticket_ttl: float = DEFAULT_TTL
    tickets_per_peer: int = DEFAULT_PER_PEER
    tickets_total: int = DEFAULT_TOTAL

    def handshakes(self) -> Limit:
        """Before its hello a connection has no peer id: it is charged by address only."""
        total = self.handshakes_total
        return Limit(per_peer=total, per_source=self.handshakes_per_source, total=total)

    def book(self) -> TicketBook:
        return TicketBook(
            ttl=self.ticket_ttl, per_peer=self.tickets_per_peer, total=self.tickets_total
        )


@dataclass(frozen=True)
class Grant:
    """What a redeemed ticket binds the TCP connection to."""

    peer_id: str
    protocol: str
    secret: bytes


@dataclass(frozen=True)
class _Entry:
    grant: Grant
    expires: float


class TicketBook:
    def __init__(
        self,
        *,
        ttl: float = DEFAULT_TTL,
        per_peer: int = DEFAULT_PER_PEER,
        total: int = DEFAULT_TOTAL,
        random_bytes: Callable[[int], bytes] = secrets.token_bytes,
    ) -> None:
        self.ttl = ttl
        self.per_peer = per_peer
        self.total = total
        self._random = random_bytes
        self._entries: dict[bytes, _Entry] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def outstanding(self, peer_id: str) -> int:
        return sum(1 for e in self._entries.values() if e.grant.peer_id == peer_id)

    def issue(self, peer_id: str, protocol: str, now: float) -> tuple[bytes, bytes] | str:
        """``(ticket, secret)``, or the reason for refusing."""
        self.expire(now)
        if len(self._entries) >= self.total:
            return "too many outstanding tickets"
        if self.outstanding(peer_id) >= self.per_peer:
            return "too many outstanding tickets for this peer"
        ticket = self._random(TICKET_BYTES)
        while ticket in self._entries:
            ticket = self._random(TICKET_BYTES)
        secret = self._random(SECRET_BYTES)
        self._entries[ticket] = _Entry(Grant(peer_id, protocol, secret), now + self.ttl)
        return ticket, secret

    def redeem(self, ticket: bytes, now: float) -> Grant | None:
        """The grant for ``ticket`` if it is known and fresh; it cannot be used again."""
        entry = self._entries.pop(ticket, None)
        if entry is None or entry.expires <= now:
            return None
        return entry.grant

    def expire(self, now: float) -> None:
        for ticket in [t for t, e in self._entries.items() if e.expires <= now]:
            del self._entries[ticket]
