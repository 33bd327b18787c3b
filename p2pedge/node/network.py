"""The node's network part: the patched py-libp2p host, its DHT, dialing and streams.

Owns everything that touches libp2p directly (private-swarm errors on dial, the
stale-connection retry of :meth:`Network.open_stream`, handler install under
:func:`~p2pedge.protocols._stream.contain`, the allow-list), so the rest of the node
speaks only peer ids, protocol ids and :class:`FramedStream`.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from contextlib import AsyncExitStack
from typing import Any

import trio

from p2pedge.dht.directory import Directory
from p2pedge.errors import LocalProtocolError, PeerUnavailable, PrivateSwarmRejected
from p2pedge.node.addresses import parse_multiaddr, peer_of
from p2pedge.node.config import NodeConfig
from p2pedge.node.identity import Identity, read_psk
from p2pedge.protocols._stream import FramedStream, contain, known_addrs, remote_host
from p2pedge.protocols.host import StreamHandler

log = logging.getLogger("p2pedge.node")


class Network:
    """A libp2p host with our Kademlia DHT; ``host`` and ``directory`` are None until
    :meth:`start` (and stay None for a node in local mode)."""

    def __init__(
        self, identity: Identity, config: NodeConfig, *, clock: Callable[[], float]
    ) -> None:
        self.config = config
        self.tuning = config.tuning
        self.identity = identity
        self.peer_id = identity.peer_id
        self.clock = clock
        self.host: Any = None
        self.directory: Directory | None = None
        self._handlers: dict[str, StreamHandler] = {}
        private = config.private
        self._psk = read_psk(private.psk_file) if private and private.psk_file else None
        self._allowed = frozenset(private.allow_peers if private else ())
        self.relay_addrs: tuple[str, ...] = ()  # circuit addresses a relay lends us
        self.upnp_addrs: tuple[str, ...] = ()  # our address on the home router's public side
        self.autonat: Any = None  # answers AutoNAT dial-backs (reach.autonat)
        self.hole_punch: Any = None  # the DCUtR service (reach.punch), when on

    async def start(self, stack: AsyncExitStack) -> None:
        """Listen, join the DHT and dial the bootstrap peers; ``stack`` closes the host."""
        from libp2p import new_host
        from libp2p.network.config import ConnectionConfig

        from p2pedge.dht._protocol import use_p2pedge_kad_protocol
        from p2pedge.dht.strict import StrictKadDHT
        from p2pedge.node.quirks import disable_auto_connect, quiet_libp2p
        from p2pedge.reach.quic import host_options, prefer_tcp

        quiet_libp2p()
        use_p2pedge_kad_protocol()
        listen = [parse_multiaddr(addr) for addr in self.config.listen]
        quic = host_options(self.config.listen, private=self._psk is not None)  # bounded
        self.host = new_host(
            key_pair=self.identity.libp2p_key_pair(),
            listen_addrs=listen,
            enable_mDNS=self.config.reach.mdns,
            psk=self._psk,
            connection_config=ConnectionConfig(max_connections_per_peer=1),
            **quic,
        )
        disable_auto_connect(self.host)
        if quic:
            prefer_tcp(self.host)
        await stack.enter_async_context(self.host.run(listen))
        if self._allowed:
            from p2pedge.node.gate import AllowListGate

            gate = AllowListGate(self._allowed, self.peer_id)
            self.host.get_network().register_notifee(gate)
        for protocol_id, handler in self._handlers.items():
            self._install_handler(protocol_id, handler)
        await self._start_reach(stack)
        # Only our own namespaces, bounded stores, PUTs and provider adds rate-limited;
        # cards may live no longer than an hour or our own announce cadence needs.
        lifetime = max(self.config.limits.dht.max_card_lifetime_s, self.tuning.card_ttl)
        limits = dataclasses.replace(self.config.limits.dht, max_card_lifetime_s=lifetime)
        dht = StrictKadDHT(self.host, limits=limits, clock=self.clock)
        if self._allowed:
            from p2pedge.node.gate import guard_handlers

            guard_handlers(self.host, self._allowed, self.peer_id)
        # Not run as a service: its main loop refreshes the whole routing table at start
        # on every node, which swamps a shared event loop. maintain() does the rest.
        self.directory = Directory(dht, clock=self.clock, timeout=self.tuning.dht_timeout)
        for addr in self.config.bootstrap:
            try:
                await self.connect(addr)
            except PeerUnavailable as exc:
                log.warning("bootstrap %s failed: %s", addr, exc)
        if self.config.bootstrap and self.tuning.self_lookup:
            await self.self_lookup()

    async def _start_reach(self, stack: AsyncExitStack) -> None:
        """Circuit relay v2 (the hop role when we lend slots, else only the receiving end),
        DCUtR hole punching and AutoNAT dial-backs (:mod:`p2pedge.reach`)."""
        from p2pedge.reach.autonat import autonat
        from p2pedge.reach.relay import accept_relayed, relay_service

        if self.config.reach.relay is not None:
            await stack.enter_async_context(relay_service(self.host, self.config.reach.relay))
        else:
            await stack.enter_async_context(accept_relayed(self.host))
        if self.config.reach.hole_punch:
            from p2pedge.reach.punch import hole_punching

            self.hole_punch = await stack.enter_async_context(hole_punching(self.host))
        self.autonat = autonat(self.host)

    def start_reach(self, nursery: trio.Nursery, addresses_changed: Callable[[], None]) -> None:
        """Hold the configured relay reservations and the UPnP mapping (their addresses join
        ours, and ``addresses_changed`` re-announces), and dial peers mDNS discovers."""
        if self.host is None:
            return
        if self.config.reach.reserve:
            from p2pedge.reach.client import ReservationKeeper

            def lent(addrs: tuple[str, ...]) -> None:
                self.relay_addrs = addrs
                addresses_changed()

            timeout = self.tuning.dht_timeout
            keeper = ReservationKeeper(self.host, self.config.reach.reserve, lent, timeout=timeout)
            nursery.start_soon(keeper.run)
        if self.config.reach.mdns:
            from p2pedge.reach.mdns import dial_discovered

            def found(peer_id: str) -> None:
                # a LAN peer's announcement starts this: it may fail, never the node
                add = self._add_to_table(peer_id)
                nursery.start_soon(contain, add, "mdns routing-table add", peer_id)

            nursery.start_soon(dial_discovered, self.host, found)
        if self.config.reach.upnp:
            from p2pedge.reach.upnp import Mapping, keep_mapped, lan_tcp_port

            def mapped(mapping: Mapping | None) -> None:
                self.upnp_addrs = (mapping.multiaddr(self.peer_id),) if mapping else ()
                addresses_changed()

            port = lan_tcp_port(self.addrs)
            if port is not None:
                nursery.start_soon(keep_mapped, port, mapped)

    async def _add_to_table(self, peer_id: str) -> None:
        from libp2p.peer.id import ID

        dht = self.require_directory().dht
        await dht.add_peer(ID.from_base58(peer_id), skip_server_mode_check=True)

    def maintain(self, nursery: trio.Nursery) -> None:
        """Refresh the routing table and drop expired DHT records, in ``nursery``."""
        if self.directory is not None:
            self.directory.dht.routing_table.start_periodic_refresh(nursery)
            nursery.start_soon(self._expire, self.directory.dht)

    async def _expire(self, dht: Any) -> None:
        """Drop expired values and provider records; our announce loop republishes ours."""
        while True:
            await trio.sleep(self.tuning.announce_interval)
            dht.value_store.cleanup_expired()
            dht.provider_store.cleanup_expired()

    async def close(self) -> None:
        """py-libp2p leaves the TCP listener open after host.run(); close it first."""
        if self.host is not None:
            with trio.move_on_after(2) as scope:
                scope.shield = True
                await self.host.get_network().close()

    def require_directory(self) -> Directory:
        if self.directory is None:
            raise LocalProtocolError("this node runs in local mode (local_only=True)")
        return self.directory

    async def self_lookup(self) -> None:
        """Fill the routing table by looking up our own id (bounded by the DHT timeout)."""
        directory = self.require_directory()
        with trio.move_on_after(self.tuning.dht_timeout):
            own = self.host.get_id().to_bytes()
            await directory.dht.peer_routing.find_closest_peers_network(own)

    @property
    def addrs(self) -> list[str]:
        if self.host is None:
            return []
        suffix = f"/p2p/{self.peer_id}"
        own = [str(a) if str(a).endswith(suffix) else f"{a}{suffix}" for a in self.host.get_addrs()]
        return [*own, *self.upnp_addrs, *self.relay_addrs]

    def known_peers(self) -> list[str]:
        """Peers in the routing table or connected now (not verified; see find_peers)."""
        if self.host is None or self.directory is None:
            return []
        ids = {p.to_base58() for p in self.directory.dht.routing_table.get_peer_ids()}
        ids |= {p.to_base58() for p in self.host.get_connected_peers()}
        ids.discard(self.peer_id)
        return sorted(ids)

    def _check_allowed(self, peer_id: str) -> None:
        if self._allowed and peer_id not in self._allowed:
            raise PrivateSwarmRejected(f"{peer_id} is not on this node's allow-list")

    async def connect(self, addr: str) -> str:
        """Dial a full multiaddr (``.../p2p/<id>``); returns the peer id."""
        from p2pedge.reach.client import dial_relayed, is_circuit

        directory = self.require_directory()
        info = peer_of(addr)
        peer_id: str = info.peer_id.to_base58()
        self._check_allowed(peer_id)
        if is_circuit(addr):  # the swarm never dials /p2p-circuit addresses itself
            await dial_relayed(self.host, addr, timeout=self.tuning.dht_timeout)
        else:
            await self._dial(info)
        await directory.dht.add_peer(info.peer_id, skip_server_mode_check=True)
        return peer_id

    async def _dial(self, info: Any) -> None:
        from libp2p.network.exceptions import SwarmException

        limit = self.tuning.private_dial_timeout if self._psk else self.tuning.dht_timeout
        private = "it is not in this private swarm or holds another pre-shared key"
        try:
            with trio.fail_after(limit):
                await self.host.connect(info)
        except trio.TooSlowError as exc:
            if self._psk:
                raise PrivateSwarmRejected(
                    f"no private-swarm handshake with {info.peer_id} within {limit:g} s: {private}"
                ) from exc
            raise PeerUnavailable(f"dial to {info.peer_id} timed out after {limit:g} s") from exc
        except (SwarmException, OSError) as exc:
            if self._psk:
                raise PrivateSwarmRejected(
                    f"private-swarm handshake with {info.peer_id} failed: {private}"
                ) from exc
            raise PeerUnavailable(f"cannot dial {info.peer_id}: {exc}") from exc

    def set_stream_handler(self, protocol_id: str, handler: StreamHandler) -> None:
        """Serve ``protocol_id``; the handler gets a FramedStream and the remote peer id."""
        self._handlers[protocol_id] = handler
        if self.host is not None:
            self._install_handler(protocol_id, handler)

    def _install_handler(self, protocol_id: str, handler: StreamHandler) -> None:
        from libp2p.custom_types import TProtocol

        async def on_stream(stream: Any) -> None:
            remote = stream.muxed_conn.peer_id.to_base58()
            if self._allowed and remote not in self._allowed:
                await stream.reset()
                return
            framed = FramedStream(stream, source=remote_host(stream))
            try:
                await contain(handler(framed, remote), protocol_id, remote)
            finally:
                with trio.move_on_after(1):
                    await framed.close()

        self.host.set_stream_handler(TProtocol(protocol_id), on_stream)

    async def open_stream(
        self, peer_id: str, protocol_id: str, *, timeout: float = 10.0
    ) -> FramedStream:
        """A framed stream to ``peer_id`` speaking ``protocol_id`` (dials if needed)."""
        from libp2p.custom_types import TProtocol
        from libp2p.peer.id import ID

        self.require_directory()
        self._check_allowed(peer_id)
        target = ID.from_base58(peer_id)
        protocols = [TProtocol(protocol_id)]
        try:
            with trio.fail_after(timeout):
                if not self.host.get_network().get_connections(target):
                    await self._reach(peer_id)
                stream = None
                # A stale connection either fails or, to a peer that vanished without
                # closing it, hangs: give the first try half the time, then dial afresh.
                with trio.move_on_after(timeout / 2):
                    try:
                        stream = await self.host.new_stream(target, protocols)
                    except Exception as first:  # py-libp2p's many failure types
                        log.debug("stream to %s failed (%r); redialing", peer_id, first)
                if stream is None:
                    await self.host.disconnect(target)
                    await self._reach(peer_id)
                    stream = await self.host.new_stream(target, protocols)
        except trio.TooSlowError as exc:
            raise PeerUnavailable(f"opening {protocol_id} to {peer_id} timed out") from exc
        except PrivateSwarmRejected:
            raise
        except Exception as exc:  # py-libp2p raises many unrelated types on dial/negotiation
            raise PeerUnavailable(f"cannot open {protocol_id} to {peer_id}: {exc!r}") from exc
        return FramedStream(stream)

    async def _ensure_addresses(self, peer_id: str) -> None:
        """Addresses for ``peer_id``: known already, else from its card, else the DHT."""
        from libp2p.peer.id import ID

        directory = self.require_directory()
        target = ID.from_base58(peer_id)
        if known_addrs(self.host, target):
            return
        card = await directory.get_card(peer_id)
        if card is not None:
            self._add_addrs(target, card.addrs)
            return
        if not await directory.locate(peer_id):
            raise PeerUnavailable(f"no address known for {peer_id}")

    async def _reach(self, peer_id: str) -> None:
        """Connect to ``peer_id``: its known or published addresses first, then through a
        relay its card names (the swarm alone skips ``/p2p-circuit`` addresses)."""
        from p2pedge.reach.client import connect, is_circuit

        await self._ensure_addresses(peer_id)
        card = await self.require_directory().get_card(peer_id)
        circuits = [a for a in (card.addrs if card is not None else ()) if is_circuit(a)]
        if not circuits:
            return  # new_stream dials the direct addresses itself
        from libp2p.peer.id import ID

        self._add_addrs(ID.from_base58(peer_id), circuits)
        await connect(self.host, peer_id, timeout=self.tuning.dht_timeout)

    def _add_addrs(self, target: Any, addrs: Sequence[str]) -> None:
        for addr in addrs:
            ttl = int(self.tuning.card_ttl)
            self.host.get_peerstore().add_addr(target, parse_multiaddr(addr), ttl)

    async def introduce(self, peer_id: str, addrs: Sequence[str]) -> bool:
        """Learn a peer's addresses and put it in the routing table without dialing."""
        from libp2p.peer.id import ID

        directory = self.require_directory()
        target = ID.from_base58(peer_id)
        self._add_addrs(target, addrs)
        return bool(await directory.dht.add_peer(target, skip_server_mode_check=True))

    async def disconnect(self, peer_id: str) -> None:
        from libp2p.peer.id import ID

        if self.host is not None:
            await self.host.disconnect(ID.from_base58(peer_id))
