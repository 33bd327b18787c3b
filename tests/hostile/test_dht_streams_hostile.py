"""Silent Kademlia streams: a peer that opens streams and says nothing holds at most its
share of the DHT's stream slots, each for at most ``stream_idle_s``; every other peer's
lookups are served meanwhile. (py-libp2p's own handler admits 12 streams from anyone and
waits on each forever: 12 silent streams stalled the node's whole DHT.)"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import trio
from libp2p.custom_types import TProtocol
from libp2p.host.exceptions import StreamFailure

from p2pedge.dht._protocol import P2PEDGE_KAD_PROTOCOL
from p2pedge.dht.limits import DhtLimits
from p2pedge.node.config import NodeConfig
from p2pedge.node.node import Node
from p2pedge.records.card import card_key
from tests.hostile.test_dht_hostile import dht_of, pipelined
from tests.hostile.test_dht_reads_hostile import find_node, get_value, victim_attacker_honest

Config = Callable[..., NodeConfig]
SILENT = 16  # more than py-libp2p's 12 slots, so the old handler fails this test


async def open_silent(attacker: Node, victim: Node) -> Any:
    """A Kademlia stream that never says anything; None when the victim reset it while
    it was being opened (a refusal that beats the protocol handshake's last read)."""
    try:
        return await attacker.host.new_stream(
            victim.host.get_id(), [TProtocol(P2PEDGE_KAD_PROTOCOL)]
        )
    except StreamFailure:
        return None


async def ended(stream: Any) -> bool:
    """Whether the victim ended ``stream`` (a reset or an end of stream), read from the
    attacker's side; the deadline only bounds a broken victim."""
    with trio.fail_after(30):
        try:
            return await stream.read(1) == b""
        except Exception:  # a reset arrives as one of several py-libp2p errors
            return True


async def test_silent_streams_hold_a_peers_share_for_the_idle_time_and_honest_peers_are_served(
    config: Config,
) -> None:
    limits = DhtLimits(max_streams_per_peer=4, stream_idle_s=1.0)
    async with victim_attacker_honest(config, limits) as (victim, attacker, honest):
        own = dht_of(victim)
        own.refused.clear()
        silent = [await open_silent(attacker, victim) for _ in range(SILENT)]
        # the victim admits the attacker's share and resets the rest as they arrive
        assert None not in silent[: limits.max_streams_per_peer]
        refused = silent[limits.max_streams_per_peer :]
        assert all([s is None or await ended(s) for s in refused])
        assert own.refused["dht.streams"] == SILENT - limits.max_streams_per_peer
        assert own.streams.held(peer=attacker.peer_id) == limits.max_streams_per_peer
        # while the admitted ones sit silent, an honest peer's lookups are answered
        reads = [find_node(b"k" * 32), get_value(card_key(honest.peer_id).encode())] * 3
        assert await pipelined(honest, victim, reads) == len(reads)
        # after the idle time the victim ends the silent streams and frees their slots
        for stream in silent[: limits.max_streams_per_peer]:
            assert await ended(stream)
        assert own.streams.held() == 0
        assert await pipelined(attacker, victim, [find_node(b"k" * 32)]) == 1
