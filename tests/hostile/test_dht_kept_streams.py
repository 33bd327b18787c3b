"""Card reads over one kept Kademlia stream per peer: reused while fresh, replaced when the
server ended it or it nears the server's idle deadline, and a peer that answers for
another key or with garbage gives nothing (never an exception out of the lookup)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import varint  # type: ignore[import-untyped]
from libp2p.custom_types import TProtocol
from libp2p.kad_dht.common import MAX_DHT_MESSAGE_SIZE
from libp2p.kad_dht.pb.kademlia_pb2 import Message
from libp2p.utils.varint import read_varint_prefixed_bytes_limited

from p2pedge.dht._protocol import P2PEDGE_KAD_PROTOCOL
from p2pedge.node.config import NodeConfig
from p2pedge.node.node import Node
from p2pedge.records.card import card_key
from tests.hostile.test_dht_hostile import dht_of

Config = Callable[..., NodeConfig]


async def test_a_peers_stream_is_kept_reused_and_replaced(config: Config) -> None:
    async with Node(config("asker")) as asker, Node(config("owner")) as owner:
        await asker.connect(owner.addrs[0])
        await owner.announce()
        assert asker.directory is not None
        streams = asker.directory.streams
        now = [0.0]
        streams.clock = lambda: now[0]
        key = card_key(owner.peer_id).encode()
        first = await streams.get_value(owner.host.get_id(), key)
        assert first is not None and first == owner.announcer.record
        assert await streams.get_value(owner.host.get_id(), key) == first
        assert streams.opened == 1  # the second read took the kept stream
        assert dht_of(owner).streams.held(peer=asker.peer_id) == 1
        # the server ended the stream (its idle deadline, say): one retry on a fresh one
        kept, _ = streams._kept[owner.host.get_id()]
        await kept.reset()
        assert await streams.get_value(owner.host.get_id(), key) == first
        assert streams.opened == 2
        # near the server's deadline the kept stream is not used again
        now[0] += streams.reuse_s
        assert await streams.get_value(owner.host.get_id(), key) == first
        assert streams.opened == 3


def scripted(replies: list[bytes]) -> Callable[[Any], Awaitable[None]]:
    """A Kademlia stream handler that answers each request with the next of ``replies``
    (shared, consumed), whatever it asked."""

    async def evil(stream: Any) -> None:
        while replies:
            try:
                await read_varint_prefixed_bytes_limited(stream, MAX_DHT_MESSAGE_SIZE)
            except Exception:  # the asker dropped this stream: a reset, in any library type
                return
            reply = replies.pop(0)
            await stream.write(varint.encode(len(reply)) + reply)
        await stream.close()

    return evil


async def test_wrong_or_garbage_replies_give_nothing(config: Config) -> None:
    replies: list[bytes] = []
    evil = scripted(replies)
    async with Node(config("asker")) as asker, Node(config("evil")) as attacker:
        await asker.connect(attacker.addrs[0])
        attacker.host.set_stream_handler(TProtocol(P2PEDGE_KAD_PROTOCOL), evil)
        assert asker.directory is not None
        streams = asker.directory.streams
        key = card_key(attacker.peer_id).encode()
        other = Message()
        other.type = Message.MessageType.GET_VALUE
        other.key = b"/p2pedge/card/someone-else"
        other.record.key = other.key
        other.record.value = b"a card for another key"
        replies += [other.SerializeToString(), b"\xff\xff\xff garbage"]
        assert await streams.get_value(attacker.host.get_id(), key) is None
        assert await streams.get_value(attacker.host.get_id(), key) is None
        assert not streams._kept  # neither stream is kept after a wrong answer
        # and the owner-first card lookup falls through without an exception
        assert await asker.directory._ask_owner(attacker.peer_id) is None
