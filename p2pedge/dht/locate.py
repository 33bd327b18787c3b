"""Find one peer's addresses: an iterative FIND_NODE that stops once any peer names it.

py-libp2p's ``find_peer`` runs the full iterative lookup for the 20 closest peers to the
target before it looks at what it found, querying every peer in that set (a new
connection and a fresh stream each; ``benchmarks/locate.py`` compares the two). A Kademlia
server puts the target itself first in its FIND_NODE reply when
it knows the target's addresses, so the first peer that does ends the search here, and
each query goes over the kept stream of :class:`~p2pedge.dht.kept.KeptStreams`.

Addresses learned from replies are hints: any peer can name any address, and a dial
authenticates the peer id it reaches. So they are stored (for ``HINT_TTL_S``) only for
peers the peerstore knows no address of, never mixed into a known peer's addresses.
"""

from __future__ import annotations

import logging
from typing import Any

import trio

from p2pedge.dht.kept import KeptStreams
from p2pedge.protocols._stream import known_addrs

log = logging.getLogger("p2pedge.dht")
ALPHA = 3  # queries in flight at once, as in Kademlia
MAX_QUERIES = 20  # peers asked in one search at most
HINT_TTL_S = 600


async def locate(
    streams: KeptStreams,
    dht: Any,
    target: Any,
    *,
    query_timeout: float = 3.0,
) -> list[Any] | None:
    """``target``'s addresses as a peer that knows them gave them, or None when the
    ``MAX_QUERIES`` closest peers asked (closest first, ``ALPHA`` at a time) did not."""
    from libp2p.kad_dht.utils import sort_peer_ids_by_distance

    host = dht.host
    me = host.get_id()
    key = target.to_bytes()
    candidates: set[Any] = set(dht.routing_table.find_local_closest_peers(key, 20))
    candidates.update(host.get_connected_peers())
    candidates.discard(me)
    candidates.discard(target)  # unknown here, or the caller would not be asking
    asked: set[Any] = set()
    found: list[Any] = []

    async def ask(peer: Any, scope: trio.CancelScope) -> None:
        closer = None  # a peer that did not answer in time names no one
        with trio.move_on_after(query_timeout):
            closer = await streams.find_node(peer, key)
        for peer_id, addrs in closer or ():
            if peer_id == target:
                if addrs and not found:
                    found.extend(addrs)
                    scope.cancel()
            elif peer_id != me and addrs:
                if not known_addrs(host, peer_id):
                    host.get_peerstore().add_addrs(peer_id, addrs, HINT_TTL_S)
                candidates.add(peer_id)

    while not found and len(asked) < MAX_QUERIES:
        fresh = [p for p in candidates if p not in asked]
        batch = sort_peer_ids_by_distance(key, fresh)[: min(ALPHA, MAX_QUERIES - len(asked))]
        if not batch:
            break
        asked.update(batch)
        async with trio.open_nursery() as nursery:
            for peer in batch:
                nursery.start_soon(ask, peer, nursery.cancel_scope)
    log.debug("located %s: %s after asking %d peers", target, bool(found), len(asked))
    return found or None
