"""Round trips to peers, measured with libp2p ping when route choice needs them.

Pings run concurrently (at most ``max_parallel``), each under ``timeout_s``; results are
kept ``ttl_s`` in a :class:`~p2pedge.planning.latency.RttTable`, so planning a route
again (after a failure, or for the next session) costs no new pings.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable

import trio

from p2pedge.planning.latency import DEFAULT_RTT_TTL_S, RttTable

log = logging.getLogger(__name__)

DEFAULT_PING_TIMEOUT_S = 0.5
DEFAULT_MAX_PINGS = 16

Pinger = Callable[[str], Awaitable[float]]


class PeerLatency:
    """``rtts(peers)``: fresh round trips, measuring the stale ones first."""

    def __init__(
        self,
        ping: Pinger,
        *,
        own_peer: str = "",
        timeout_s: float = DEFAULT_PING_TIMEOUT_S,
        ttl_s: float = DEFAULT_RTT_TTL_S,
        max_parallel: int = DEFAULT_MAX_PINGS,
    ) -> None:
        self.ping = ping
        self.own_peer = own_peer
        self.timeout_s = timeout_s
        self.table = RttTable(ttl_s)
        self.max_parallel = max_parallel
        self.pings_sent = 0

    async def rtts(self, peers: Iterable[str]) -> dict[str, float]:
        wanted = [p for p in peers if p != self.own_peer]
        self.table.forget_stale(trio.current_time())
        stale = self.table.stale(wanted, trio.current_time())
        limiter = trio.CapacityLimiter(self.max_parallel)
        async with trio.open_nursery() as nursery:
            for peer in stale:
                nursery.start_soon(self._measure, peer, limiter)
        known = self.table.known(wanted, trio.current_time())
        if self.own_peer:
            known[self.own_peer] = 0.0
        return known

    async def _measure(self, peer: str, limiter: trio.CapacityLimiter) -> None:
        async with limiter:
            self.pings_sent += 1
            rtt = self.timeout_s  # what a silent or failing peer is charged
            with trio.move_on_after(self.timeout_s):
                try:
                    rtt = await self.ping(peer)
                except Exception as exc:  # py-libp2p raises many unrelated types on dial
                    log.debug("ping %s failed (charged %.3g s): %r", peer, rtt, exc)
            self.table.record(peer, rtt, trio.current_time())


async def libp2p_ping(host: object, peer: str) -> float:
    """Seconds for one ping round trip on an open ping stream (libp2p's ``/ipfs/ping``).

    The first exchange also opens and negotiates the stream, so the second is timed.
    """
    from libp2p.host.ping import PingService
    from libp2p.peer.id import ID

    began = 0.0
    async for _ in PingService(host).ping_iter(ID.from_base58(peer), ping_amt=2):
        if began:
            return trio.current_time() - began
        began = trio.current_time()
    raise ConnectionError(f"ping to {peer} returned no round trips")
