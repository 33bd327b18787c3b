"""What the node's model services may use of the node: its parts, never the Node.

A :class:`NodeContext` is the host protocol (``p2pedge.protocols.host.PeerFinder``)
plus what the pipeline's servers and sessions read (``PipelineNode`` in
``p2pedge.protocols.pipeline.serving``): each name is bound to the part that owns it.
"""

from __future__ import annotations

from collections.abc import Callable

import trio

from p2pedge.node.announcer import Announcer
from p2pedge.node.config import NodeConfig
from p2pedge.node.lanes import Lanes
from p2pedge.node.latency import PeerLatency
from p2pedge.node.network import Network
from p2pedge.node.peers import Peers
from p2pedge.planning.latency import StepTimes
from p2pedge.records.card import CapabilityCard


class NodeContext:
    def __init__(
        self,
        config: NodeConfig,
        network: Network,
        peers: Peers,
        announcer: Announcer,
        lanes: Lanes,
        latency: PeerLatency,
        step_times: StepTimes,
        nursery: Callable[[], trio.Nursery],
    ) -> None:
        self.config = config
        self.local_only = config.local_only
        self.peer_id = network.peer_id
        self.lanes = lanes
        self.latency = latency
        self.step_times = step_times
        self._announcer = announcer
        self._nursery = nursery
        self.set_stream_handler = network.set_stream_handler
        self.open_stream = network.open_stream
        self.card_of = peers.card_of
        self.find_peers = peers.find_peers
        self.provide = peers.provide
        self.find_providers = peers.find_providers
        self.set_models = announcer.set_models
        self.set_layers_served = announcer.set_layers_served

    @property
    def card(self) -> CapabilityCard:
        return self._announcer.card

    @property
    def nursery(self) -> trio.Nursery:
        return self._nursery()
