"""``p2pedge.Node``: the composition root. It builds the parts and wires each to what it
needs, owns the nursery, and orders start and shutdown.

``async with Node(config) as node:`` starts a libp2p host (TCP, Noise, Yamux) with the
Kademlia DHT under our own protocol id (:mod:`~p2pedge.node.network`), signs and announces
this node's capability card (:mod:`~p2pedge.node.announcer`), answers peer queries
(:mod:`~p2pedge.node.peers`), and runs the model services
(:mod:`~p2pedge.node.models`, reached through the facade's ``generate``, ``ask``, ...).
With ``local_only=True`` nothing listens or dials, and local features still work.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from contextlib import AsyncExitStack
from functools import partial
from types import TracebackType
from typing import Any

import trio

from p2pedge.dht.directory import Directory
from p2pedge.errors import LocalProtocolError
from p2pedge.node.announcer import Announcer
from p2pedge.node.config import NodeConfig
from p2pedge.node.context import NodeContext
from p2pedge.node.facade import ModelsFacade
from p2pedge.node.hardware import cached_gflops, probe_hardware
from p2pedge.node.identity import Identity
from p2pedge.node.lanes import Lanes, lane_host
from p2pedge.node.latency import PeerLatency, libp2p_ping
from p2pedge.node.models import NodeModels
from p2pedge.node.network import Network
from p2pedge.node.peers import Peers
from p2pedge.planning.latency import StepTimes
from p2pedge.protocols._stream import FramedStream
from p2pedge.protocols.host import StreamHandler
from p2pedge.records.card import CapabilityCard, ServedLayers

log = logging.getLogger("p2pedge.node")


class Node(ModelsFacade):
    """One p2pedge peer. Every background task lives in :attr:`nursery`.

    The parts are public for what the Node does not forward: :attr:`network` (libp2p, the
    DHT, dialing), :attr:`announcer` (the card and its setters), :attr:`peers` (DHT
    queries), :attr:`lanes`, :attr:`latency`, :attr:`models`, and :attr:`context` (what
    protocol services get: the parts, never the Node). ``identity`` defaults to the one
    kept in ``config.data_dir`` (created on first use); simulations pass a seeded one.
    """

    def __init__(
        self,
        config: NodeConfig | None = None,
        *,
        identity: Identity | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config = config or NodeConfig()
        self.identity = identity or Identity.load_or_create(config.data_dir)
        self.peer_id: str = self.identity.peer_id
        self.started = False
        self.api_port: int | None = None  # where the OpenAI-compatible API listens
        self._nursery: trio.Nursery | None = None
        self._stack: AsyncExitStack | None = None
        self._tasks = AsyncExitStack()
        self.network = Network(self.identity, config, clock=clock)
        self.announcer = Announcer(
            self.identity,
            config.tuning,
            clock=clock,
            addrs=lambda: self.network.addrs,
            load=lambda: self.models.inference.load(),
            directory=lambda: self.network.directory,
        )
        self.peers = Peers(self.network, lambda: self.announcer.card)
        self.lanes = Lanes(
            self.network,
            lambda: self.nursery,
            enabled=config.direct_lane is not None and not config.local_only,
            listen_host=lane_host(config.listen),
            port=config.direct_lane or 0,
            limits=config.limits.lane,
        )
        self.latency = PeerLatency(
            lambda peer: libp2p_ping(self.network.host, peer), own_peer=self.peer_id
        )
        self.step_times = StepTimes()  # decode steps our sharded sessions saw, per hop
        self.context = NodeContext(
            config, self.network, self.peers, self.announcer, self.lanes, self.latency,
            self.step_times, lambda: self.nursery,
        )  # fmt: skip
        self.models = NodeModels(self.context)

    # -- lifecycle ---------------------------------------------------------------------

    async def __aenter__(self) -> Node:
        if self.started:
            raise LocalProtocolError("a Node can be started once")
        hardware = await trio.to_thread.run_sync(probe_hardware, self.config.data_dir)
        gflops = 0.0
        if self.config.tuning.measure_compute:
            gflops = await trio.to_thread.run_sync(cached_gflops, self.config.data_dir)
        # Two stacks, nested: the network (host, DHT) outside, our tasks inside, so that on
        # exit every task has finished before the network closes under it.
        stack = AsyncExitStack()
        await stack.__aenter__()
        tasks = AsyncExitStack()
        try:
            if not self.config.local_only:
                await self.network.start(stack)
            await tasks.__aenter__()
            self._nursery = await tasks.enter_async_context(trio.open_nursery())
            tasks.callback(self._nursery.cancel_scope.cancel)
            self.network.maintain(self._nursery)
        except BaseException:
            await tasks.aclose()
            await stack.aclose()
            raise
        self._stack, self._tasks, self.started = stack, tasks, True
        self.announcer.start(hardware, gflops)
        try:
            await self.models.start()
            if self.config.api is not None:
                from p2pedge.node.api import serve_node_api

                self.api_port = await self._nursery.start(
                    partial(
                        serve_node_api,
                        self,
                        self.config.api.listen,
                        key_file=self.config.api.key_file,
                        cors_origins=self.config.api.cors_origins,
                    )
                )  # stops with the node's tasks, before the models close
        except BaseException:
            await self.__aexit__(None, None, None)
            raise
        if not self.config.local_only and self.config.tuning.announce_on_start:
            self.announcer.start_announcing(self._nursery)
        self.network.start_reach(self._nursery, self.announcer.addresses_changed)
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
            await self.network.close()
        finally:
            await stack.__aexit__(exc_type, exc, tb)
        return None

    @property
    def nursery(self) -> trio.Nursery:
        if self._nursery is None:
            raise LocalProtocolError("node is not running; use `async with Node(...)`")
        return self._nursery

    # -- what users call most (the rest lives on the parts) ----------------------------

    @property
    def host(self) -> Any:
        """The running py-libp2p host (None before start and in local mode)."""
        return self.network.host

    @property
    def directory(self) -> Directory | None:
        """Cards and provider records on the DHT (None before start and in local mode)."""
        return self.network.directory

    @property
    def addrs(self) -> list[str]:
        return self.network.addrs

    @property
    def card(self) -> CapabilityCard:
        return self.announcer.card

    async def connect(self, addr: str) -> str:
        """Dial a full multiaddr (``.../p2p/<id>``); returns the peer id."""
        return await self.network.connect(addr)

    async def open_stream(
        self, peer_id: str, protocol_id: str, *, timeout: float = 10.0
    ) -> FramedStream:
        """A framed stream to ``peer_id`` speaking ``protocol_id`` (dials if needed)."""
        return await self.network.open_stream(peer_id, protocol_id, timeout=timeout)

    def set_stream_handler(self, protocol_id: str, handler: StreamHandler) -> None:
        """Serve ``protocol_id``; the handler gets a FramedStream and the remote peer id."""
        self.network.set_stream_handler(protocol_id, handler)

    def set_layers_served(self, layers: Sequence[ServedLayers]) -> None:
        """Declare the blocks this node serves (its shard servers call this)."""
        self.announcer.set_layers_served(layers)

    async def announce(self, *, replicate: bool = True) -> None:
        """Sign a fresh card and store it on the DHT (see :meth:`Announcer.announce`)."""
        await self.announcer.announce(replicate=replicate)

    async def announced(self, count: int = 1) -> None:
        """Wait until ``count`` announces have completed since the node started."""
        await self.announcer.announced(count)

    async def card_of(self, peer_id: str, *, refresh: bool = False) -> CapabilityCard | None:
        """A peer's verified card (ours for our own id), or None when none is found."""
        return await self.peers.card_of(peer_id, refresh=refresh)

    async def find_peers(
        self, model: str | None = None, *, limit: int = 64
    ) -> list[CapabilityCard]:
        """Verified cards of peers (with ``model`` cached, when given), self included."""
        return await self.peers.find_peers(model, limit=limit)
