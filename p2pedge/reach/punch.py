"""Hole punching: upgrading a relayed connection to a direct one (DCUtR).

py-libp2p 0.8's ``DCUtRProtocol`` does the exchange: both peers swap the addresses they
expect to be reachable at (the public IP the relay observed, with their listen port,
since its punch dials leave from the listen port), then dial each other at once so each
NAT sees outgoing traffic before the other side's packets arrive. That works through
NATs that keep a flow's source port (endpoint-independent mapping); behind a NAT that
picks a random port per flow it cannot, and the peers stay on the relay.

We run it as a service and watch connections: :func:`connection_kinds` says whether a
peer is reached directly, through a relay, or both, and :class:`ConnectionWatch` wakes
waiters when a connection opens or closes (no polling).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import trio

from p2pedge.errors import PeerUnavailable

DIRECT = "direct"
RELAYED = "relayed"


def connection_kinds(host: Any, peer_id: str) -> list[str]:
    """The kind of every open connection to ``peer_id`` (empty: not connected)."""
    from libp2p.peer.id import ID

    kinds = []
    for conn in host.get_network().get_connections(ID.from_base58(peer_id)):
        try:
            addrs = [str(a) for a in conn.get_transport_addresses()]
        except (AttributeError, OSError):
            addrs = []
        kinds.append(RELAYED if any("/p2p-circuit" in a for a in addrs) else DIRECT)
    return sorted(kinds)


def stream_kind(host: Any, peer_id: str, stream: Any) -> str | None:
    """Whether a libp2p stream to ``peer_id`` runs over a direct or a relayed connection."""
    from libp2p.peer.id import ID

    muxed = getattr(stream, "muxed_conn", None)
    for conn in host.get_network().get_connections(ID.from_base58(peer_id)):
        if getattr(conn, "muxed_conn", None) is muxed:
            addrs = [str(a) for a in conn.get_transport_addresses()]
            return RELAYED if any("/p2p-circuit" in a for a in addrs) else DIRECT
    return None


class ConnectionWatch:
    """A network notifee whose event fires on every connection change."""

    def __init__(self, host: Any) -> None:
        from libp2p.abc import INotifee

        self.host = host
        self.changed = trio.Event()
        watch = self

        class _Notifee(INotifee):  # type: ignore[misc]
            async def opened_stream(self, network: Any, stream: Any) -> None:
                return None

            async def closed_stream(self, network: Any, stream: Any) -> None:
                return None

            async def connected(self, network: Any, conn: Any) -> None:
                watch._fire()

            async def disconnected(self, network: Any, conn: Any) -> None:
                watch._fire()

            async def listen(self, network: Any, multiaddr: Any) -> None:
                return None

            async def listen_close(self, network: Any, multiaddr: Any) -> None:
                return None

        host.get_network().register_notifee(_Notifee())

    def _fire(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    async def wait_for(self, peer_id: str, kind: str, timeout: float, *, open: bool = True) -> None:
        """Return once a ``kind`` connection to ``peer_id`` is open (``open=False``: once
        none is); PeerUnavailable past ``timeout``."""
        with trio.move_on_after(timeout):
            while (kind in connection_kinds(self.host, peer_id)) != open:
                await self.changed.wait()
            return
        state = "open" if open else "closed"
        raise PeerUnavailable(f"{kind} connection to {peer_id} not {state} within {timeout:g} s")


@asynccontextmanager
async def hole_punching(host: Any, *, dial_timeout: int = 5) -> AsyncIterator[Any]:
    """Run DCUtR on ``host``: answer punch requests, and start one towards every peer we
    reach only through a relay (its own loop notices new relayed connections)."""
    from libp2p.relay.circuit_v2.dcutr import DCUtRProtocol
    from libp2p.tools.anyio_service import background_trio_service

    protocol = DCUtRProtocol(host, dial_timeout=dial_timeout)
    async with background_trio_service(protocol):
        await protocol.event_started.wait()
        yield protocol


async def punch(protocol: Any, peer_id: str) -> bool:
    """Try to upgrade our relayed connection to ``peer_id`` now; True when direct."""
    from libp2p.peer.id import ID

    return bool(await protocol.initiate_hole_punch(ID.from_base58(peer_id)))
