"""DHT reads under a flood: FIND_NODE, GET_VALUE and GET_PROVIDERS cost units of one
budget per peer, per source address and in total. A raw attacker over loopback is cut at
its budget (the stream is reset, the refusal counted under ``dht.read``), the victim
still answers an honest peer, and a swarm's normal lookups are never refused."""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import pytest
import trio
from libp2p.kad_dht.pb.kademlia_pb2 import Message

from p2pedge.dht.limits import DhtLimits
from p2pedge.dht.strict import ReadRate, sender
from p2pedge.errors import Busy
from p2pedge.node.config import NodeConfig
from p2pedge.node.limits import Limits
from p2pedge.node.node import Node
from p2pedge.records.card import card_key
from simnet.swarm import Swarm
from tests.hostile.test_dht_hostile import dht_of, pipelined, quiet

Config = Callable[..., NodeConfig]


def test_reads_are_charged_by_cost_and_minted_ids_share_their_address() -> None:
    now = [100.0]
    limits = DhtLimits(
        read_rate=1.0, read_burst=4, source_share=2, read_total_rate=1.0, read_total_burst=20
    )
    refused: Counter[str] = Counter()
    reads = ReadRate(limits, lambda: now[0], refused)
    reads.charge(1.0, first=False)  # our own lookup: no sender, never charged
    with sender("peer-a", "10.0.0.1"):
        reads.charge(2.0, first=True)  # a GET_VALUE: charged at the store ...
        reads.charge(1.0, first=False)  # ... and its routing-table lookup is free
        reads.charge(1.0, first=False)  # a FIND_NODE
        reads.charge(1.0, first=False)
        with pytest.raises(Busy) as cut:
            reads.charge(1.0, first=False)
        assert (cut.value.limit, cut.value.scope) == ("dht.read", "peer")
    with sender("peer-b", "10.0.0.1"):  # a minted id on the same address: the rest of it
        for _ in range(4):
            reads.charge(1.0, first=False)
    with sender("peer-c", "10.0.0.1"), pytest.raises(Busy) as cut:
        reads.charge(1.0, first=False)
    assert (cut.value.limit, cut.value.scope) == ("dht.read", "source")
    with sender("peer-d", "10.0.0.2"):  # another address is unaffected ...
        reads.charge(4.0, first=False)
    now[0] += 1.0  # ... and time refills the bucket
    with sender("peer-a", "10.0.0.1"):
        reads.charge(1.0, first=False)
    for i in range(2):  # the total: everyone together
        with sender(f"peer-{i}", f"10.0.1.{i}"):
            reads.charge(4.0, first=False)
    with sender("peer-x", "10.0.2.1"), pytest.raises(Busy) as cut:
        reads.charge(2.0, first=False)
    assert (cut.value.limit, cut.value.scope) == ("dht.read", "total")
    assert refused == {"dht.read": 3}


def find_node(key: bytes) -> Message:
    message = Message()
    message.type = Message.MessageType.FIND_NODE
    message.key = key
    return message


def get_value(key: bytes) -> Message:
    message = Message()
    message.type = Message.MessageType.GET_VALUE
    message.key = key
    return message


@asynccontextmanager
async def victim_attacker_honest(
    config: Config, limits: DhtLimits
) -> AsyncIterator[tuple[Node, Node, Node]]:
    """A victim with DHT ``limits``, a quiet attacker and an announced honest peer, both
    connected to the victim."""
    victim_config = config("victim", announce_on_start=False, limits=Limits(dht=limits))
    async with Node(victim_config) as victim, Node(quiet(config, "attacker")) as attacker:
        async with Node(config("honest")) as honest:
            for node in (attacker, honest):
                await node.connect(victim.addrs[0])
            await honest.announce()
            yield victim, attacker, honest


async def test_a_read_flood_is_cut_at_its_budget_and_honest_peers_are_served(
    config: Config,
) -> None:
    dht = DhtLimits(read_rate=1.0, read_burst=40)
    async with victim_attacker_honest(config, dht) as (victim, attacker, honest):
        own = dht_of(victim)
        key = attacker.host.get_id().to_bytes()
        answered = await pipelined(attacker, victim, [find_node(key) for _ in range(300)])
        # the burst (less what connecting cost) and what the rate refilled meanwhile
        assert dht.read_burst / 2 <= answered <= dht.read_burst + 2
        assert own.refused["dht.read"] == 1  # the stream ends at the refusal
        # a fresh stream is refused too (the budget is the peer's); GET_VALUE costs 2
        values = [get_value(card_key(honest.peer_id).encode()) for _ in range(50)]
        assert await pipelined(attacker, victim, values) <= 2
        assert own.refused["dht.read"] == 2
        # the victim still answers an honest peer's lookups and serves its card
        honest_reads = [find_node(key), get_value(card_key(honest.peer_id).encode())] * 3
        assert await pipelined(honest, victim, honest_reads) == len(honest_reads)
        assert own.refused["dht.read"] == 2
        assert honest.peer_id in {c.peer_id for c in await victim.find_peers()}


async def test_a_swarm_converges_with_read_limits_on_and_none_refused() -> None:
    async with Swarm(8, seed=41, wait_for_replication=True, measure_compute=False) as swarm:
        nodes = swarm.nodes
        peers = {n.peer_id for n in nodes}
        for node in nodes:
            assert {c.peer_id for c in await node.find_peers()} == peers

        async def look_up_everyone(node: Node) -> None:
            """What a node does on joining, at once: an iterative lookup per peer."""
            async with trio.open_nursery() as nursery:
                for other in nodes:
                    target = other.host.get_id().to_bytes()
                    nursery.start_soon(dht_of(node).peer_routing.find_closest_peers_network, target)

        async with trio.open_nursery() as nursery:
            for node in nodes:
                nursery.start_soon(look_up_everyone, node)
        for node in nodes:
            own = dht_of(node)
            assert own.refused["dht.read"] == own.refused["dht.streams"] == 0
            spent = own.reads.total.burst - own.reads.total._buckets["total"][0]
            assert spent > 0  # reads were charged: the limits were on
