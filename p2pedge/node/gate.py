"""Allow-list gate: closes any connection from a peer id that is not on the list."""

from __future__ import annotations

import logging
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
