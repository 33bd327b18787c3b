"""The swarm directory: a facade over py-libp2p's KadDHT for cards and providers.

It owns what py-libp2p leaves to us: short hashed keys (lookups break past ~50 bytes)
and our own timeouts (a frozen peer is never detected by the library). What the DHT
admits (verified cards only, within limits) is :mod:`p2pedge.dht.strict`'s job.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import trio

from p2pedge.dht.kept import KeptStreams
from p2pedge.dht.locate import locate
from p2pedge.errors import InvalidRecord
from p2pedge.protocols._stream import known_addrs
from p2pedge.records.card import MAX_CARD_LIFETIME_S, CapabilityCard, verify_card
from p2pedge.records.keys import card_key, provider_record_key

log = logging.getLogger("p2pedge.dht")


provider_key = provider_record_key  # the raw key of a provider record (see records.keys)
ADDRS_TTL_S = 3600  # how long a located peer's addresses stay in the peerstore
CONNECTED_SCAN = 20  # routing-table peers nearest a card's key scanned for open connections
CONNECTED_ASKS = 3  # of those, how many connected ones are asked before dialing anyone
STAGGER_S = 0.25  # a connected peer's head start before the next one is asked as well


class Directory:
    """Cards and provider records on the DHT, with a local cache of verified cards.

    Cards are stored at the ``replication`` closest peers we know rather than py-libp2p's
    k = 20: they are re-announced every interval, and each extra replica costs a dial
    with a full Noise and identify handshake. Reads go from cheap to dear: our own replica;
    the owner (the authority on its own card) when we hold a connection to it; the peers
    nearest the key that we hold connections to; then the owner by dialing (an unknown
    owner's address is located first, see :mod:`p2pedge.dht.locate`); then the closest
    peers at large, and last the library's full iterative lookup. A replica is at most one
    announce interval older than the owner's card, the same staleness a local replica has.
    Our own card reads and searches go over one kept stream per peer
    (:mod:`p2pedge.dht.kept`).
    """

    def __init__(
        self,
        dht: Any,
        *,
        clock: Callable[[], float] = time.time,
        timeout: float = 10.0,
        replication: int = 6,
    ) -> None:
        self.dht = dht
        self.clock = clock
        self.timeout = timeout
        self.replication = replication
        self._cards: dict[str, CapabilityCard] = {}
        limits = getattr(dht, "limits", None)
        self.max_lifetime = limits.max_card_lifetime_s if limits else MAX_CARD_LIFETIME_S
        # reuse a stream only well within the idle deadline that servers like us enforce
        idle = limits.stream_idle_s if limits else 10.0
        self.streams = KeptStreams(dht.host, reuse_s=0.8 * idle, timeout=timeout)

    def _verify(self, record: bytes, key: str | None = None) -> CapabilityCard:
        return verify_card(record, self.clock(), key, max_lifetime=self.max_lifetime)

    async def _closest(self, key: bytes) -> list[Any]:
        table = self.dht.routing_table
        if table.size() < self.replication:
            with trio.move_on_after(self.timeout):
                await self.dht.peer_routing.find_closest_peers_network(key, self.replication)
        local = self.dht.local_peer_id
        return [p for p in table.find_local_closest_peers(key, self.replication + 1) if p != local][
            : self.replication
        ]

    async def put_card(self, record: bytes, peer_id: str, *, replicate: bool = True) -> int:
        """Store our card locally and (``replicate``) at the closest peers; returns how
        many peers accepted it."""
        card = self._verify(record)
        key = card_key(peer_id).encode()
        self.dht.value_store.put(key, record)
        self.remember(card)
        stored = 0
        if not replicate:
            return stored

        async def store(peer: Any) -> None:
            nonlocal stored
            with trio.move_on_after(self.timeout):
                if await self.dht.value_store._store_at_peer(peer, key, record):
                    stored += 1

        async with trio.open_nursery() as nursery:
            for peer in await self._closest(key):
                nursery.start_soon(store, peer)
        return stored

    async def _ask_owner(self, peer_id: str) -> bytes | None:
        """A peer is the authority on its own card: ask it first when we can reach it."""
        from libp2p.peer.id import ID

        owner = ID.from_base58(peer_id)
        if owner == self.dht.local_peer_id:
            return None
        value: Any = None
        with trio.move_on_after(self.timeout):
            if not known_addrs(self.dht.host, owner) and not await self.locate(peer_id):
                return None
            value = await self.streams.get_value(owner, card_key(peer_id).encode())
        if not isinstance(value, bytes):
            return None
        try:
            self._verify(value, card_key(peer_id))
        except InvalidRecord as exc:
            log.warning("peer %s returned a bad card for itself: %s", peer_id, exc)
            return None
        return value

    def _connected(self, peer_id: str) -> bool:
        from libp2p.peer.id import ID

        return bool(self.dht.host.get_network().connections.get(ID.from_base58(peer_id)))

    async def locate(self, peer_id: str) -> bool:
        """Find ``peer_id``'s addresses on the DHT (see :mod:`p2pedge.dht.locate`) and
        keep them in the peerstore; False when no peer asked knew them."""
        from libp2p.peer.id import ID

        target = ID.from_base58(peer_id)
        addrs = await locate(self.streams, self.dht, target)
        if addrs is None:
            return False
        self.dht.host.get_peerstore().add_addrs(target, addrs, ADDRS_TTL_S)
        return True

    async def _ask_closest(self, peer_id: str, *, connected_only: bool = False) -> bytes | None:
        """Ask the closest known peers to the card's key concurrently; the first valid card
        ends the search. ``connected_only`` asks, in turn, only peers we hold a connection
        to (at most ``CONNECTED_ASKS``, the owner left out), so the question costs no
        handshake."""
        key = card_key(peer_id).encode()
        if connected_only:
            peers = self._closest_connected(key, peer_id)
            if not peers:
                return None
        else:
            peers = await self._closest(key)
        answer: bytes | None = None

        async def ask(peer: Any, cancel_scope: trio.CancelScope, done: trio.Event) -> None:
            nonlocal answer
            try:
                with trio.move_on_after(self.timeout):
                    value = await self.streams.get_value(peer, key)
                    if not isinstance(value, bytes):
                        return
                    try:
                        self._verify(value, card_key(peer_id))
                    except InvalidRecord as exc:
                        log.warning("peer %s returned a bad card for %s: %s", peer, peer_id, exc)
                        return
                    answer = value
                    cancel_scope.cancel()
            finally:
                done.set()

        # connected peers answer in a round trip: ask them in turn (the next after a miss
        # or STAGGER_S), so one that holds the card spares the others the work
        stagger = STAGGER_S if connected_only else 0.0
        async with trio.open_nursery() as nursery:
            for peer in peers:
                done = trio.Event()
                nursery.start_soon(ask, peer, nursery.cancel_scope, done)
                if stagger:
                    with trio.move_on_after(stagger):
                        await done.wait()
        return answer

    def _closest_connected(self, key: bytes, owner: str) -> list[Any]:
        """The peers closest to ``key`` in our routing table that we are connected to now,
        the card's owner left out (asked on its own before)."""
        connections = self.dht.host.get_network().connections
        skip = {self.dht.local_peer_id.to_base58(), owner}
        near = self.dht.routing_table.find_local_closest_peers(key, CONNECTED_SCAN)
        return [p for p in near if p.to_base58() not in skip and connections.get(p)][
            :CONNECTED_ASKS
        ]

    def remember(self, card: CapabilityCard) -> None:
        cached = self._cards.get(card.peer_id)
        if cached is None or cached.issued_at <= card.issued_at:
            self._cards[card.peer_id] = card

    def cached_card(self, peer_id: str) -> CapabilityCard | None:
        card = self._cards.get(peer_id)
        if card is not None and card.expires_at <= self.clock():
            del self._cards[peer_id]
            return None
        return card

    def forget(self, peer_id: str) -> None:
        self._cards.pop(peer_id, None)

    async def get_card(self, peer_id: str, *, refresh: bool = False) -> CapabilityCard | None:
        """A verified, current card, or None; invalid records from peers are logged."""
        if not refresh and (cached := self.cached_card(peer_id)) is not None:
            return cached
        local = self.dht.value_store.get(card_key(peer_id).encode())
        value: bytes | None = local.value if local is not None else None
        owner_asked = value is None and self._connected(peer_id)
        if owner_asked:
            value = await self._ask_owner(peer_id)
        if value is None:
            value = await self._ask_closest(peer_id, connected_only=True)
        if value is None and not owner_asked:
            value = await self._ask_owner(peer_id)
        if value is None:
            value = await self._ask_closest(peer_id)
        if value is None:
            with trio.move_on_after(self.timeout):
                value = await self.dht.get_value(card_key(peer_id))
        if value is None:
            return self.cached_card(peer_id)
        try:
            card = self._verify(value, card_key(peer_id))
        except InvalidRecord as exc:
            log.warning("rejected card for %s: %s", peer_id, exc)
            return self.cached_card(peer_id)
        self.remember(card)
        return self.cached_card(peer_id)

    async def provide(self, key: str) -> int:
        """Record ourselves as a provider locally and at the closest known peers."""
        from libp2p.peer.peerinfo import PeerInfo

        store = self.dht.provider_store
        raw = bytes.fromhex(provider_key(key))
        store.providing_keys.add(raw)
        store.add_provider(raw, PeerInfo(self.dht.host.get_id(), list(self.dht.host.get_addrs())))
        accepted = 0

        async def send(peer: Any) -> None:
            nonlocal accepted
            with trio.move_on_after(self.timeout):
                if await self._add_provider_confirmed(peer, raw):
                    accepted += 1

        async with trio.open_nursery() as nursery:
            for peer in await self._closest(raw):
                nursery.start_soon(send, peer)
        return accepted

    async def _add_provider_confirmed(self, peer: Any, raw: bytes) -> bool:
        """ADD_PROVIDER, then wait for the server's echo.

        py-libp2p sends ADD_PROVIDER fire-and-forget, so a record may land after
        ``provide`` returns; waiting for the echo its server sends makes the record
        visible to lookups as soon as we return.
        """
        import varint  # type: ignore[import-untyped]
        from libp2p.custom_types import TProtocol
        from libp2p.kad_dht.common import MAX_DHT_MESSAGE_SIZE
        from libp2p.kad_dht.pb.kademlia_pb2 import Message
        from libp2p.network.stream.exceptions import StreamError
        from libp2p.peer.peerstore import env_to_send_in_RPC
        from libp2p.utils.varint import read_varint_prefixed_bytes_limited

        from p2pedge.dht._protocol import P2PEDGE_KAD_PROTOCOL

        host = self.dht.host
        stream = None
        try:
            stream = await host.new_stream(peer, [TProtocol(P2PEDGE_KAD_PROTOCOL)])
            envelope, _ = env_to_send_in_RPC(host)
            message = Message()
            message.type = Message.MessageType.ADD_PROVIDER
            message.key = raw
            message.senderRecord = envelope
            provider = message.providerPeers.add()
            provider.id = host.get_id().to_bytes()
            provider.addrs.extend(addr.to_bytes() for addr in host.get_addrs())
            provider.signedRecord = envelope
            payload = message.SerializeToString()
            await stream.write(varint.encode(len(payload)) + payload)
            echo = Message()
            echo.ParseFromString(
                await read_varint_prefixed_bytes_limited(stream, MAX_DHT_MESSAGE_SIZE)
            )
            return bool(echo.type == Message.MessageType.ADD_PROVIDER and echo.key == raw)
        except (StreamError, OSError, ValueError, trio.BrokenResourceError) as exc:
            log.debug("ADD_PROVIDER to %s failed: %s", peer, exc)
            return False
        except Exception as exc:  # dial and negotiation errors come in many library types
            log.debug("ADD_PROVIDER to %s failed: %r", peer, exc)
            return False
        finally:
            if stream is not None:
                with trio.move_on_after(1):
                    await stream.close()

    async def find_providers(self, key: str, limit: int = 20) -> list[str]:
        """Providers from our own store and the closest known peers; iterative lookup last."""
        store = self.dht.provider_store
        raw = bytes.fromhex(provider_key(key))
        found: dict[str, None] = {}

        def add(infos: list[Any]) -> None:
            for info in infos:
                self.dht.host.get_peerstore().add_addrs(info.peer_id, info.addrs, 3600)
                found.setdefault(info.peer_id.to_base58(), None)

        add(store.get_providers(raw))

        async def ask(peer: Any) -> None:
            with trio.move_on_after(self.timeout):
                providers, _closer = await store._get_providers_from_peer_with_closers(peer, raw)
                add(providers)

        async with trio.open_nursery() as nursery:
            for peer in await self._closest(raw):
                nursery.start_soon(ask, peer)
        if not found:
            with trio.move_on_after(self.timeout):
                add(await self.dht.find_providers(provider_key(key), limit))
        return list(found)[:limit]
