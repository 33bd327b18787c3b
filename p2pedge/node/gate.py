"""Allow-list gate: closes any connection from a peer id that is not on the list.

The gate acts once a connection is up, and the connection's streams are served from
that moment, so :func:`guard_handlers` also resets, before it runs, any stream of an
unlisted peer that reaches a handler (identify, Kademlia) in that window.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from libp2p.abc import INotifee

log = logging.getLogger("p2pedge.node")


class AllowListGate(INotifee):  # type: ignore[misc]
    def __init__(self, allowed: frozenset[str], own_id: str) -> None:
        self.allowed = allowed | {own_id}

    async def connected(self, network: Any, conn: Any) -> None:
        remote = conn.muxed_conn.peer_id.to_base58()
        if remote not in self.allowed:
            log.warning("closing connection from %s: not on the allow-list", remote)
            await conn.close()

    async def disconnected(self, network: Any, conn: Any) -> None:
        return None

    async def opened_stream(self, network: Any, stream: Any) -> None:
        return None

    async def closed_stream(self, network: Any, stream: Any) -> None:
        return None

    async def listen(self, network: Any, multiaddr: Any) -> None:
        return None

    async def listen_close(self, network: Any, multiaddr: Any) -> None:
        return None


def guard_handlers(host: Any, allowed: frozenset[str], own_id: str) -> None:
    """Wrap every stream handler ``host`` has now so that unlisted peers' streams are
    reset unserved. Call it after the last library handler (e.g. Kademlia's) is set."""
    admitted = allowed | {own_id}
    mux = host.get_mux()
    for protocol, handler in list(mux.handlers.items()):
        if handler is not None:
            mux.add_handler(protocol, _guarded(handler, admitted))


def _guarded(
    handler: Callable[[Any], Awaitable[None]], admitted: frozenset[str]
) -> Callable[[Any], Awaitable[None]]:
    async def guarded(stream: Any) -> None:
        remote = stream.muxed_conn.peer_id.to_base58()
        if remote not in admitted:
            log.debug("reset a stream from %s: not on the allow-list", remote)
            await stream.reset()
            return
        await handler(stream)

    return guarded
