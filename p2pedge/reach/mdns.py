"""Dialing the peers mDNS discovers on the local network.

py-libp2p 0.8 (``enable_mDNS``) puts each discovered peer's addresses in the peerstore
and calls ``peerDiscovery`` handlers from zeroconf's own thread; nothing dials them, so
``--mdns`` found peers that were never connected. We hand each discovery to the trio
loop through a bounded channel (a flood of announcements drops, never queues without
end) and dial it once, with a deadline.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import trio

log = logging.getLogger("p2pedge.reach")

MAX_PENDING = 64  # discoveries waiting to be dialed; more are dropped (re-announced later)


def _found_before(host: Any) -> list[Any]:
    """Peers the host's mDNS listener reported before our handler was registered."""
    from libp2p.peer.peerinfo import PeerInfo
    from libp2p.peer.peerstore import PeerStoreError

    listener = getattr(getattr(host, "mDNS", None), "listener", None)
    found = getattr(listener, "discovered_services", {})
    infos = []
    for peer_id, _ in list(found.values()):
        try:
            infos.append(PeerInfo(peer_id, host.get_peerstore().addrs(peer_id)))
        except PeerStoreError:
            continue  # expired from the peerstore since: mDNS will announce it again
    return infos


async def dial_discovered(
    host: Any,
    on_connected: Callable[[str], None] | None = None,
    *,
    timeout: float = 10.0,
    max_peers: int = 256,
) -> None:
    """Dial every peer mDNS reports, once each, until cancelled.

    ``on_connected`` gets the peer id of each peer we connected to (e.g. to add it to
    the DHT routing table). At most ``max_peers`` distinct peers are dialed.
    """
    from libp2p.discovery.events.peerDiscovery import peerDiscovery

    send, receive = trio.open_memory_channel[Any](MAX_PENDING)
    token = trio.lowlevel.current_trio_token()
    own = host.get_id()

    def discovered(info: Any) -> None:  # runs on zeroconf's thread
        try:
            trio.from_thread.run_sync(send.send_nowait, info, trio_token=token)
        except (trio.WouldBlock, trio.RunFinishedError, trio.BrokenResourceError):
            log.debug("mDNS discovery of %s dropped", getattr(info, "peer_id", "?"))

    peerDiscovery.register_peer_discovered_handler(discovered)
    for info in _found_before(host)[:MAX_PENDING]:  # mDNS starts with the host, before us
        send.send_nowait(info)
    seen: set[Any] = set()
    try:
        async with receive:
            async for info in receive:
                if info.peer_id == own or info.peer_id in seen or len(seen) >= max_peers:
                    continue
                seen.add(info.peer_id)
                try:
                    with trio.fail_after(timeout):
                        await host.connect(info)
                except trio.TooSlowError:
                    log.info("mDNS peer %s did not answer in %g s", info.peer_id, timeout)
                    seen.discard(info.peer_id)  # a later announcement may try again
                    continue
                except Exception as exc:  # py-libp2p's dial errors have no common base
                    log.info("cannot dial mDNS peer %s: %r", info.peer_id, exc)
                    seen.discard(info.peer_id)
                    continue
                if on_connected is not None:
                    on_connected(info.peer_id.to_base58())
    finally:
        peerDiscovery.unregister_peer_discovered_handler(discovered)
        send.close()
