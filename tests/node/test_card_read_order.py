"""A card read goes from cheap to dear: a connected owner first (it is the authority), then
connected peers near the card's key (no handshake), and only then a dial to the owner."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import trio

from p2pedge.node.config import NodeConfig
from p2pedge.node.node import Node
from p2pedge.records.keys import card_key

Config = Callable[..., NodeConfig]


def connected(node: Node, other: Node) -> bool:
    return bool(node.host.get_network().connections.get(other.host.get_id()))


async def test_a_connected_replica_answers_without_a_dial_to_the_owner(config: Config) -> None:
    async with (
        Node(config("holder")) as holder,
        Node(config("owner", bootstrap=(holder.addrs[0],))) as owner,
        Node(config("asker", bootstrap=(holder.addrs[0],))) as asker,
    ):
        await owner.announce()  # the holder, its only peer, keeps a replica
        assert holder.directory is not None and asker.directory is not None
        assert holder.directory.dht.value_store.get(card_key(owner.peer_id).encode())
        asker.directory.dht.value_store.remove(card_key(owner.peer_id).encode())
        asker.directory.forget(owner.peer_id)
        await asker.network.host.disconnect(owner.host.get_id())
        assert not connected(asker, owner) and connected(asker, holder)
        with trio.fail_after(10):
            card = await asker.card_of(owner.peer_id, refresh=True)
        assert card is not None and card.peer_id == owner.peer_id
        assert not connected(asker, owner)  # the replica answered: no handshake with it


async def test_a_connected_owner_is_asked_before_an_older_replica(
    config: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with (
        Node(config("holder")) as holder,
        Node(config("owner", bootstrap=(holder.addrs[0],))) as owner,
        Node(config("asker", bootstrap=(holder.addrs[0],))) as asker,
    ):
        await owner.announce()
        older = owner.announcer.record
        owner.announcer.set_card_extra("mark", "current")
        with trio.fail_after(10):
            await owner.announcer.next_announce()
        assert owner.announcer.record != older
        assert holder.directory is not None
        holder.directory.dht.value_store.put(card_key(owner.peer_id).encode(), older)
        await asker.connect(owner.addrs[0])
        assert asker.directory is not None
        asker.directory.dht.value_store.remove(card_key(owner.peer_id).encode())
        asker.directory.forget(owner.peer_id)
        # whatever the keys' distances, the holder is the connected peer nearest the card
        near = [holder.host.get_id()]
        monkeypatch.setattr(type(asker.directory), "_closest_connected", lambda _s, _k, _o: near)
        with trio.fail_after(10):
            card = await asker.card_of(owner.peer_id, refresh=True)
        assert card is not None and card.extra.get("mark") == "current"  # the owner's card
