"""``p2pedge.Node``: the composition root that owns the nursery, the host and the DHT.

``async with Node(config) as node:`` starts a libp2p host (TCP, Noise, Yamux), the
Kademlia DHT under our own protocol id, and the announce loop that publishes this
node's signed capability card. With ``local_only=True`` nothing listens or dials, and
local features still work.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AsyncExitStack
from functools import partial
from types import TracebackType
from typing import TYPE_CHECKING, Any

import trio

from p2pedge import __version__
from p2pedge.dht.directory import Directory
from p2pedge.errors import LocalProtocolError, PeerUnavailable, PrivateSwarmRejected
from p2pedge.node.addresses import parse_multiaddr, peer_of
from p2pedge.node.config import NodeConfig
from p2pedge.node.facade import ModelsFacade
from p2pedge.node.hardware import Hardware, cached_gflops, probe_hardware, ram_available
from p2pedge.node.identity import Identity, read_psk
from p2pedge.planning.latency import StepTimes
from p2pedge.protocols._stream import FramedStream, contain, remote_host
from p2pedge.records.card import CachedModel, CapabilityCard, ServedLayers, sign_card

if TYPE_CHECKING:
    from p2pedge.node.models import NodeModels

log = logging.getLogger("p2pedge.node")

StreamHandler = Callable[[FramedStream, str], Awaitable[None]]


class Node(ModelsFacade):
    """One p2pedge peer. Every background task lives in :attr:`nursery`."""

    def __init__(
        self, config: NodeConfig | None = None, *, clock: Callable[[], float] = time.time
    ) -> None:
        self.config = config or NodeConfig()
        self.clock = clock
        seed = self.config.identity_seed
        self.identity = (
            Identity.from_seed(seed) if seed else Identity.load_or_create(self.config.data_dir)
        )
        self.peer_id: str = self.identity.peer_id
        self.host: Any = None
        self.directory: Directory | None = None
        self._nursery: trio.Nursery | None = None
        self._stack: AsyncExitStack | None = None
        self._tasks = AsyncExitStack()
        self._handlers: dict[str, StreamHandler] = {}
        self._models: tuple[CachedModel, ...] = ()
        self._layers: tuple[ServedLayers, ...] = ()
        self._extra: dict[str, Any] = {}
        self._hardware: Hardware | None = None
        self._gflops = 0.0
        self._card: CapabilityCard | None = None
        self._card_record: bytes | None = None
        self._announce_now = trio.Event()
        self._announces_started = 0
        self._announces_done = 0
        self._announce_finished = trio.Event()
        self._psk = read_psk(self.config.psk_file) if self.config.psk_file else None
        self._allowed = frozenset(self.config.allow_peers)
        self.started = False
        self.api_port: int | None = None  # where the OpenAI-compatible API listens
        from p2pedge.node.lanes import Lanes
        from p2pedge.node.latency import PeerLatency, libp2p_ping
        from p2pedge.node.models import NodeModels

        self.lanes = Lanes(self, self.config.limits.lane)
        self.latency = PeerLatency(lambda peer: libp2p_ping(self.host, peer), own_peer=self.peer_id)
        self.step_times = StepTimes()  # decode steps our sharded sessions saw, per hop
        self.models: NodeModels = NodeModels(self)

    # -- lifecycle ---------------------------------------------------------------------

    async def __aenter__(self) -> Node:
        if self.started:
            raise LocalProtocolError("a Node can be started once")
        self._hardware = await trio.to_thread.run_sync(probe_hardware)
        if self.config.measure_compute:
            self._gflops = await trio.to_thread.run_sync(cached_gflops, self.config.data_dir)
        # Two stacks, nested: the network (host, DHT) outside, our tasks inside, so that on
        # exit every task has finished before the network closes under it.
        stack = AsyncExitStack()
        await stack.__aenter__()
        tasks = AsyncExitStack()
        try:
            if not self.config.local_only:
                await self._start_network(stack)
            await tasks.__aenter__()
            self._nursery = await tasks.enter_async_context(trio.open_nursery())
            tasks.callback(self._nursery.cancel_scope.cancel)
            if self.directory is not None:
                self.directory.dht.routing_table.start_periodic_refresh(self._nursery)
                self._nursery.start_soon(self._dht_maintenance, self.directory.dht)
        except BaseException:
            await tasks.aclose()
            await stack.aclose()
            raise
        self._stack = stack
        self._tasks = tasks
        self.started = True
        self._refresh_card()
        try:
            await self.models.start()
            if self.config.api is not None:
                from p2pedge.api.server import serve_node_api

                self.api_port = await self._nursery.start(
                    partial(
                        serve_node_api,
                        self,
                        self.config.api,
                        key_file=self.config.api_key_file,
                        cors_origins=self.config.api_cors_origins,
                    )
                )  # stops with the node's tasks, before the models close
        except BaseException:
            await self.__aexit__(None, None, None)
            raise
        if not self.config.local_only and self.config.announce_on_start:
            self._nursery.start_soon(self._announce_loop, True)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        stack, self._stack = self._stack, None
        if stack is None:
            return None
        try:
            await self._tasks.__aexit__(None, None, None)  # our tasks end before the network
            self.models.close()
            if self.host is not None:
                # py-libp2p leaves the TCP listener open after host.run(); close it first.
                with trio.move_on_after(2) as scope:
                    scope.shield = True
                    await self.host.get_network().close()
        finally:
            await stack.__aexit__(exc_type, exc, tb)
        return None

    async def _start_network(self, stack: AsyncExitStack) -> None:
        from libp2p import new_host
        from libp2p.network.config import ConnectionConfig

        from p2pedge.dht._protocol import use_p2pedge_kad_protocol
        from p2pedge.dht.strict import StrictKadDHT
        from p2pedge.node.quirks import disable_auto_connect, quiet_libp2p

        quiet_libp2p()
        use_p2pedge_kad_protocol()
        listen = [parse_multiaddr(addr) for addr in self.config.listen]
        self.host = new_host(
            key_pair=self.identity.libp2p_key_pair(),
            listen_addrs=listen,
            enable_mDNS=self.config.mdns,
            psk=self._psk,
            connection_config=ConnectionConfig(max_connections_per_peer=1),
        )
        disable_auto_connect(self.host)
        await stack.enter_async_context(self.host.run(listen))
        if self._allowed:
            from p2pedge.node.gate import AllowListGate

            self.host.get_network().register_notifee(AllowListGate(self._allowed, self.peer_id))
        for protocol_id, handler in self._handlers.items():
            self._install_handler(protocol_id, handler)
        # Only our own namespaces, bounded stores, PUTs and provider adds rate-limited;
        # cards may live no longer than an hour or our own announce cadence needs.
        lifetime = max(self.config.limits.dht.max_card_lifetime_s, self.config.card_ttl)
        limits = dataclasses.replace(self.config.limits.dht, max_card_lifetime_s=lifetime)
        dht = StrictKadDHT(self.host, limits=limits, clock=self.clock)
        if self._allowed:
            from p2pedge.node.gate import guard_handlers

            guard_handlers(self.host, self._allowed, self.peer_id)
        # Not run as a service: its main loop refreshes the whole routing table at start
        # on every node, which swamps a shared event loop. Our maintenance does the rest.
        self.directory = Directory(dht, clock=self.clock, timeout=self.config.dht_timeout)
        await self._bootstrap()

    async def _dht_maintenance(self, dht: Any) -> None:
        """Drop expired values and provider records; our announce loop republishes ours."""
        while True:
            await trio.sleep(self.config.announce_interval)
            dht.value_store.cleanup_expired()
            dht.provider_store.cleanup_expired()

    async def _bootstrap(self) -> None:
        for addr in self.config.bootstrap:
            try:
                await self.connect(addr)
            except PeerUnavailable as exc:
                log.warning("bootstrap %s failed: %s", addr, exc)
        if self.config.bootstrap and self.config.self_lookup:
            await self.self_lookup()

    async def self_lookup(self) -> None:
        """Fill the routing table by looking up our own id (bounded by the DHT timeout)."""
        assert self.directory is not None
        with trio.move_on_after(self.config.dht_timeout):
            await self.directory.dht.peer_routing.find_closest_peers_network(
                self.host.get_id().to_bytes()
            )

    @property
    def nursery(self) -> trio.Nursery:
        if self._nursery is None:
            raise LocalProtocolError("node is not running; use `async with Node(...)`")
        return self._nursery

    # -- identity and card -------------------------------------------------------------

    @property
    def addrs(self) -> list[str]:
        if self.host is None:
            return []
        suffix = f"/p2p/{self.peer_id}"
        return [
            str(a) if str(a).endswith(suffix) else f"{a}{suffix}" for a in self.host.get_addrs()
        ]

    @property
    def card(self) -> CapabilityCard:
        if self._card is None:
            raise LocalProtocolError("node is not running; use `async with Node(...)`")
        return self._card

    def _refresh_card(self) -> None:
        assert self._hardware is not None
        now = self.clock()
        hw = self._hardware
        self._card = CapabilityCard(
            peer_id=self.peer_id,
            public_key=self.identity.public_key,
            addrs=tuple(self.addrs),
            software_version=__version__,
            os=hw.os,
            arch=hw.arch,
            cpu_cores=hw.cpu_cores,
            ram_total=hw.ram_total,
            ram_available=ram_available(),
            accelerators=hw.accelerators,
            execution_providers=hw.execution_providers,
            compute_gflops=self._gflops,
            models=self._models,
            layers_served=self._layers,
            load=self.models.inference.load(),
            issued_at=now,
            expires_at=now + self.config.card_ttl,
            extra=dict(self._extra),
        )
        self._card_record = sign_card(self._card, self.identity.private_key)

    def set_models(self, models: Sequence[CachedModel]) -> None:
        """Declare the models this node has cached; announced at once."""
        self._models = tuple(models)
        self._card_changed()

    def set_layers_served(self, layers: Sequence[ServedLayers]) -> None:
        self._layers = tuple(layers)
        self._card_changed()

    def set_card_extra(self, key: str, value: Any) -> None:
        self._extra[key] = value
        self._card_changed()

    def _card_changed(self) -> None:
        """Our card reads the change at once; peers see it at the next announce (now)."""
        if self._card is not None:
            self._refresh_card()
        self._announce_now.set()

    async def announce(self, *, replicate: bool = True) -> None:
        """Sign a fresh card, store it on the DHT, and provide each model's key.

        ``replicate=False`` only keeps the card in our own store, where peers that know
        our address can ask for it; nothing is dialed.
        """
        self._announces_started += 1
        number = self._announces_started
        try:
            await self._publish(replicate)
        finally:
            self._announces_done = max(self._announces_done, number)
            finished, self._announce_finished = self._announce_finished, trio.Event()
            finished.set()

    async def announced(self, count: int = 1) -> None:
        """Wait until ``count`` announces have completed since the node started."""
        while self._announces_done < count:
            await self._announce_finished.wait()

    async def next_announce(self) -> None:
        """Wait for an announce that starts after this call (e.g. after set_models)."""
        await self.announced(self._announces_started + 1)

    async def _publish(self, replicate: bool) -> None:
        self._refresh_card()
        if self.directory is None or self._card_record is None:
            return
        await self.directory.put_card(self._card_record, self.peer_id, replicate=replicate)
        if not replicate:
            return
        # Served blocks are in the card (layers_served), where routing reads them.
        keys = {f"model/{m.id.split('@')[0]}" for m in self._models}
        keys |= {f"model/{m.id}" for m in self._models}
        for key in sorted(keys):
            await self.directory.provide(key)

    def start_announcing(self, *, now: bool = True) -> None:
        """Begin the periodic announce loop (started on entry unless announce_on_start=False).

        ``now=False`` waits one interval first, for a caller that has just announced.
        """
        self.nursery.start_soon(self._announce_loop, now)

    async def _announce_loop(self, now: bool = True) -> None:
        if not now:
            await self._wait_for_reannounce()
        while True:
            await self.announce()
            await self._wait_for_reannounce()

    async def _wait_for_reannounce(self) -> None:
        with trio.move_on_after(self.config.announce_interval):
            await self._announce_now.wait()
        self._announce_now = trio.Event()

    # -- queries -----------------------------------------------------------------------

    def _require_network(self) -> Directory:
        if self.directory is None:
            raise LocalProtocolError("this node runs in local mode (local_only=True)")
        return self.directory

    async def card_of(self, peer_id: str, *, refresh: bool = False) -> CapabilityCard | None:
        if peer_id == self.peer_id:
            return self.card
        return await self._require_network().get_card(peer_id, refresh=refresh)

    def known_peers(self) -> list[str]:
        """Peers in the routing table or connected now (not verified; see find_peers)."""
        if self.host is None or self.directory is None:
            return []
        ids = {p.to_base58() for p in self.directory.dht.routing_table.get_peer_ids()}
        ids |= {p.to_base58() for p in self.host.get_connected_peers()}
        ids.discard(self.peer_id)
        return sorted(ids)

    async def find_peers(
        self, model: str | None = None, *, limit: int = 64
    ) -> list[CapabilityCard]:
        """Verified cards of peers (with ``model`` cached, when given), self included."""
        directory = self._require_network()
        if model is None:
            candidates = self.known_peers()
        else:
            candidates = await directory.find_providers(f"model/{model}", limit)
        cards: dict[str, CapabilityCard] = {}

        async def fetch(peer_id: str) -> None:
            card = await self.card_of(peer_id)
            if card is not None and (model is None or card.has_model(model)):
                cards[peer_id] = card

        async with trio.open_nursery() as nursery:
            for peer_id in candidates[:limit]:
                nursery.start_soon(fetch, peer_id)
        if model is None or self.card.has_model(model):
            cards[self.peer_id] = self.card
        return sorted(cards.values(), key=lambda c: c.peer_id)

    async def provide(self, key: str) -> bool:
        """Announce ``key`` as a provider record; True when a peer took a replica."""
        return await self._require_network().provide(key) > 0

    async def find_providers(self, key: str, *, limit: int = 20) -> list[str]:
        return await self._require_network().find_providers(key, limit)

    # -- connections and streams -------------------------------------------------------

    async def connect(self, addr: str) -> str:
        """Dial a full multiaddr (``.../p2p/<id>``); returns the peer id."""
        self._require_network()
        info = peer_of(addr)
        peer_id: str = info.peer_id.to_base58()
        if self._allowed and peer_id not in self._allowed:
            raise PrivateSwarmRejected(f"{peer_id} is not on this node's allow-list")
        await self._dial(info)
        assert self.directory is not None
        await self.directory.dht.add_peer(info.peer_id, skip_server_mode_check=True)
        return peer_id

    async def _dial(self, info: Any) -> None:
        from libp2p.network.exceptions import SwarmException

        limit = self.config.private_dial_timeout if self._psk else self.config.dht_timeout
        try:
            with trio.fail_after(limit):
                await self.host.connect(info)
        except trio.TooSlowError as exc:
            if self._psk:
                raise PrivateSwarmRejected(
                    f"no private-swarm handshake with {info.peer_id} within {limit:g} s: "
                    "it is not in this private swarm or holds another pre-shared key"
                ) from exc
            raise PeerUnavailable(f"dial to {info.peer_id} timed out after {limit:g} s") from exc
        except (SwarmException, OSError) as exc:
            if self._psk:
                raise PrivateSwarmRejected(
                    f"private-swarm handshake with {info.peer_id} failed: "
                    "it is not in this private swarm or holds another pre-shared key"
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

        self._require_network()
        if self._allowed and peer_id not in self._allowed:
            raise PrivateSwarmRejected(f"{peer_id} is not on this node's allow-list")
        target = ID.from_base58(peer_id)
        try:
            with trio.fail_after(timeout):
                if not self.host.get_network().get_connections(target):
                    await self._ensure_addresses(peer_id)
                stream = None
                # A stale connection either fails or, to a peer that vanished without
                # closing it, hangs: give the first try half the time, then dial afresh.
                with trio.move_on_after(timeout / 2):
                    try:
                        stream = await self.host.new_stream(target, [TProtocol(protocol_id)])
                    except Exception as first:  # py-libp2p's many failure types
                        log.debug("stream to %s failed (%r); redialing", peer_id, first)
                if stream is None:
                    await self.host.disconnect(target)
                    await self._ensure_addresses(peer_id)
                    stream = await self.host.new_stream(target, [TProtocol(protocol_id)])
        except trio.TooSlowError as exc:
            raise PeerUnavailable(f"opening {protocol_id} to {peer_id} timed out") from exc
        except PrivateSwarmRejected:
            raise
        except Exception as exc:  # py-libp2p raises many unrelated types on dial/negotiation
            raise PeerUnavailable(f"cannot open {protocol_id} to {peer_id}: {exc!r}") from exc
        return FramedStream(stream)

    async def _ensure_addresses(self, peer_id: str) -> None:
        from libp2p.peer.id import ID
        from libp2p.peer.peerstore import PeerStoreError

        target = ID.from_base58(peer_id)
        try:
            if self.host.get_peerstore().addrs(target):
                return
        except PeerStoreError:
            pass  # unknown peer: look it up below
        card = await self.card_of(peer_id)
        if card is not None:
            for addr in card.addrs:
                self.host.get_peerstore().add_addr(
                    target, parse_multiaddr(addr), int(self.config.card_ttl)
                )
            return
        assert self.directory is not None
        info = await self.directory.dht.find_peer(target)
        if info is None:
            raise PeerUnavailable(f"no address known for {peer_id}")
        self.host.get_peerstore().add_addrs(target, info.addrs, int(self.config.card_ttl))

    async def introduce(self, peer_id: str, addrs: Sequence[str]) -> bool:
        """Learn a peer's addresses and put it in the routing table without dialing."""
        from libp2p.peer.id import ID

        directory = self._require_network()
        target = ID.from_base58(peer_id)
        for addr in addrs:
            self.host.get_peerstore().add_addr(
                target, parse_multiaddr(addr), int(self.config.card_ttl)
            )
        return bool(await directory.dht.add_peer(target, skip_server_mode_check=True))

    async def disconnect(self, peer_id: str) -> None:
        from libp2p.peer.id import ID

        if self.host is not None:
            await self.host.disconnect(ID.from_base58(peer_id))
