"""Locating a peer's addresses (``Directory.locate``): the first peer that names the
target ends the search, and a peer that answers FIND_NODE wrongly, with garbage or with
addresses for peers we know gives nothing and changes nothing we knew."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import trio
from libp2p.custom_types import TProtocol
from libp2p.kad_dht.pb.kademlia_pb2 import Message
from libp2p.peer.id import ID
from multiaddr import Multiaddr

from p2pedge.dht import kept as kept_module
from p2pedge.dht import locate as locate_module
from p2pedge.dht._protocol import P2PEDGE_KAD_PROTOCOL
from p2pedge.errors import RemoteProtocolError
from p2pedge.node.config import NodeConfig
from p2pedge.node.node import Node
from tests.hostile.test_dht_kept_streams import scripted

Config = Callable[..., NodeConfig]


def forget(node: Node, other: Node) -> None:
    """``node`` knows nothing of ``other``: no address, no routing-table entry."""
    assert node.directory is not None
    peer = other.host.get_id()
    node.directory.dht.routing_table.remove_peer(peer)
    node.host.get_peerstore().clear_addrs(peer)


def addrs_of(node: Node, other: Node) -> set[str]:
    return {str(a) for a in node.host.get_peerstore().addrs(other.host.get_id())}


async def test_the_first_peer_that_knows_the_target_ends_the_search(
    config: Config, monkeypatch: Any
) -> None:
    asked: list[Any] = []
    find_node = locate_module.KeptStreams.find_node

    async def counted(self: Any, peer: Any, target: bytes) -> Any:
        asked.append(peer)
        return await find_node(self, peer, target)

    monkeypatch.setattr(locate_module.KeptStreams, "find_node", counted)
    async with (
        Node(config("middle")) as middle,
        Node(config("asker", bootstrap=(middle.addrs[0],))) as asker,
        Node(config("target", bootstrap=(middle.addrs[0],))) as target,
    ):
        forget(asker, target)
        assert asker.directory is not None
        with trio.fail_after(10):
            assert await asker.directory.locate(target.peer_id)
        assert set(target.addrs) <= addrs_of(asker, target)
        assert asked == [middle.host.get_id()]  # one query: the middle peer named it
        # and the owner-first card read now finds the target's card through it
        forget(asker, target)
        await target.announce()
        assert await asker.directory._ask_owner(target.peer_id) == target.announcer.record


async def test_wrong_or_poisoning_find_node_replies_give_nothing(config: Config) -> None:
    replies: list[bytes] = []
    evil = scripted(replies)

    async with (
        Node(config("evil")) as attacker,
        Node(config("asker", bootstrap=(attacker.addrs[0],))) as asker,
        Node(config("known", bootstrap=(attacker.addrs[0],))) as known,
        Node(config("target")) as target,
    ):
        await asker.connect(known.addrs[0])
        attacker.host.set_stream_handler(TProtocol(P2PEDGE_KAD_PROTOCOL), evil)
        assert asker.directory is not None
        assert addrs_of(asker, known)
        poison = Message()
        poison.type = Message.MessageType.FIND_NODE
        entry = poison.closerPeers.add()
        entry.id = known.host.get_id().to_bytes()
        entry.addrs.append(Multiaddr("/ip4/127.0.0.9/tcp/9").to_bytes())
        stranger = poison.closerPeers.add()
        stranger.id = ID.from_base58(target.peer_id).to_bytes()[:3]  # not the target
        wrong = Message()
        wrong.type = Message.MessageType.GET_VALUE
        for _ in range(4):
            replies += [poison.SerializeToString(), wrong.SerializeToString(), b"\xff garbage"]
        with trio.fail_after(20):
            assert not await asker.directory.locate(target.peer_id)
        # a hint never joins a known peer's addresses
        assert not any("127.0.0.9" in a for a in addrs_of(asker, known))


async def test_a_silent_peer_ends_its_query_not_the_search(config: Config) -> None:
    """A peer that never answers FIND_NODE costs its query's timeout and nothing else."""

    async def silent(stream: Any) -> None:
        await trio.sleep_forever()

    async with (
        Node(config("silent")) as quiet,
        Node(config("asker", bootstrap=(quiet.addrs[0],))) as asker,
        Node(config("target")) as target,
    ):
        quiet.host.set_stream_handler(TProtocol(P2PEDGE_KAD_PROTOCOL), silent)
        assert asker.directory is not None
        directory = asker.directory
        with trio.fail_after(5):
            found = await locate_module.locate(
                directory.streams, directory.dht, target.host.get_id(), query_timeout=0.5
            )
        assert found is None


def test_a_find_node_reply_is_read_within_bounds() -> None:
    """At most 20 closer peers of 8 addresses each; an empty, unparsable or oversized
    address is left out; a peer without an id or of another reply kind is the peer's
    error (RemoteProtocolError), never a crash."""
    reply = Message()
    reply.type = Message.MessageType.FIND_NODE
    for i in range(30):
        peer = reply.closerPeers.add()
        peer.id = bytes([0, 36, 8, 1, 18, 32]) + bytes([i]) * 32
        good = Multiaddr(f"/ip4/127.0.0.1/tcp/{1000 + i}").to_bytes()
        peer.addrs.extend([b"", b"\xff\xff bad", b"\x04" + b"\x7f" * 600] + [good] * 9)
    closer = kept_module._closer_of(reply.SerializeToString())
    assert len(closer) == kept_module.MAX_CLOSER
    assert all(len(addrs) == kept_module.MAX_ADDRS - 3 for _, addrs in closer)
    anonymous = Message()
    anonymous.type = Message.MessageType.FIND_NODE
    anonymous.closerPeers.add().addrs.append(good)  # a closer peer without an id
    with pytest.raises(RemoteProtocolError):
        kept_module._closer_of(anonymous.SerializeToString())
    wrong = Message()
    wrong.type = Message.MessageType.GET_VALUE
    with pytest.raises(RemoteProtocolError):
        kept_module._closer_of(wrong.SerializeToString())
