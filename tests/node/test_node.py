import dataclasses
import os
import stat
from collections.abc import Callable

import pytest
import trio

from p2pedge.errors import LocalProtocolError, PeerUnavailable, PrivateSwarmRejected
from p2pedge.node.config import NodeConfig, PrivateSwarm
from p2pedge.node.identity import write_psk
from p2pedge.node.node import Node
from p2pedge.protocols._stream import FramedStream
from p2pedge.records.card import CachedModel, card_key
from p2pedge.wire.messages import pack

Config = Callable[..., NodeConfig]


async def test_two_nodes_see_each_others_verified_cards(config: Config) -> None:
    async with Node(config("a")) as a, Node(config("b")) as b:
        await b.connect(a.addrs[0])
        await a.announce()
        await b.announce()
        card_of_a = await b.card_of(a.peer_id, refresh=True)
        card_of_b = await a.card_of(b.peer_id, refresh=True)
        assert card_of_a is not None and card_of_a.peer_id == a.peer_id
        assert card_of_b is not None and card_of_b.public_key == b.identity.public_key
        assert card_of_a.addrs == tuple(a.addrs)
        assert card_of_a.cpu_cores >= 1 and "CPUExecutionProvider" in card_of_a.execution_providers
        assert {c.peer_id for c in await b.find_peers()} == {a.peer_id, b.peer_id}


async def test_model_announcement_is_found_by_model(config: Config) -> None:
    async with Node(config("a")) as a:
        async with Node(config("b", bootstrap=(a.addrs[0],))) as b:
            b.announcer.set_models([CachedModel("tiny@1", "cd" * 32)])
            await b.announce()
            found = await a.find_peers("tiny")
            assert [c.peer_id for c in found] == [b.peer_id]
            assert await a.find_peers("absent") == []


async def test_forged_expired_and_oversized_cards_are_rejected_by_every_node(
    config: Config,
) -> None:
    async with (
        Node(config("victim")) as victim,
        Node(config("honest")) as honest,
        Node(config("evil")) as evil,
    ):
        for node in (honest, evil):
            await node.connect(victim.addrs[0])
        await evil.connect(honest.addrs[0])
        await victim.announce()
        legit = victim.card
        evil_key = evil.identity.private_key
        key = card_key(victim.peer_id).encode()

        forged_body = pack(
            {
                **legit.content(),
                "load": 0.99,
                "issued_at": legit.issued_at + 10,
                "expires_at": legit.expires_at + 10,
                "v": 1,
            }
        )
        forged = pack({"body": forged_body, "sig": evil_key.sign(forged_body)})
        expired_card = dataclasses.replace(evil.card, issued_at=1.0, expires_at=2.0)
        big_card = dataclasses.replace(
            evil.card, addrs=tuple(f"/ip4/10.1.{i // 250}.{i % 250}/tcp/1" for i in range(900))
        )
        big_body = pack(
            {
                **big_card.content(),
                "issued_at": big_card.issued_at,
                "expires_at": big_card.expires_at,
                "v": 1,
            }
        )
        oversized = pack({"body": big_body, "sig": evil_key.sign(big_body)})
        expired_body = pack({**expired_card.content(), "issued_at": 1.0, "expires_at": 2.0, "v": 1})
        expired = pack({"body": expired_body, "sig": evil_key.sign(expired_body)})

        assert evil.directory is not None
        store = evil.directory.dht.value_store
        evil_key_bytes = card_key(evil.peer_id).encode()
        assert evil.directory.dht.value_store.get(evil_key_bytes) is not None
        own_card = evil.directory.dht.value_store.get(evil_key_bytes).value
        for target in (victim, honest):
            target_id = target.host.get_id()
            assert await store._store_at_peer(target_id, evil_key_bytes, own_card)  # control
            assert not await store._store_at_peer(target_id, key, forged)
            assert not await store._store_at_peer(target_id, evil_key_bytes, expired)
            assert not await store._store_at_peer(target_id, evil_key_bytes, oversized)
        for node in (victim, honest):
            assert node.directory is not None
            held = node.directory.dht.value_store.get(key)
            assert held is None or held.value != forged
            evil_held = node.directory.dht.value_store.get(evil_key_bytes)
            assert evil_held is None or evil_held.value not in (expired, oversized)
            card = await node.card_of(victim.peer_id, refresh=True)
            assert (
                card is not None and card.load == legit.load and card.issued_at == legit.issued_at
            )


async def test_psk_mismatch_is_reported_quickly(config: Config, tmp_path: object) -> None:
    psk_a, psk_b = tmp_path / "a.key", tmp_path / "b.key"  # type: ignore[operator]
    write_psk(psk_a)
    write_psk(psk_b)
    async with (
        Node(config("a", private=PrivateSwarm(psk_file=psk_a))) as a,
        Node(config("b", private=PrivateSwarm(psk_file=psk_b))) as b,
    ):
        start = trio.current_time()
        with pytest.raises(PrivateSwarmRejected, match="pre-shared key"):
            await b.connect(a.addrs[0])
        assert trio.current_time() - start < 5.0


async def test_same_psk_connects_and_plain_node_is_refused(
    config: Config, tmp_path: object
) -> None:
    psk = tmp_path / "swarm.key"  # type: ignore[operator]
    write_psk(psk)
    async with (
        Node(config("a", private=PrivateSwarm(psk_file=psk))) as a,
        Node(config("b", private=PrivateSwarm(psk_file=psk))) as b,
    ):
        assert await b.connect(a.addrs[0]) == a.peer_id
        await a.announce()
        card = await b.card_of(a.peer_id, refresh=True)
        assert card is not None and card.peer_id == a.peer_id
        async with Node(config("outsider", private_dial_timeout=3.0, dht_timeout=3.0)) as outsider:
            with pytest.raises(PeerUnavailable):
                await outsider.connect(a.addrs[0])


async def echo(stream: FramedStream, peer: str) -> None:
    message = await stream.receive()
    await stream.send({"echo": message["n"], "from": peer})


async def test_allow_list_admits_only_listed_peers(config: Config) -> None:
    async with Node(config("b")) as b, Node(config("c")) as c:
        async with Node(config("a", private=PrivateSwarm(allow_peers=(b.peer_id,)))) as a:
            a.set_stream_handler("/test/echo/1", echo)
            assert await b.connect(a.addrs[0]) == a.peer_id
            stream = await b.open_stream(a.peer_id, "/test/echo/1")
            await stream.send({"n": 7})
            assert await stream.receive(timeout=5) == {"echo": 7, "from": b.peer_id}
            with pytest.raises(PeerUnavailable):
                await c.connect(a.addrs[0])
                bad = await c.open_stream(a.peer_id, "/test/echo/1", timeout=5)
                await bad.send({"n": 1})
                await bad.receive(timeout=5)


async def test_local_mode_never_listens(config: Config) -> None:
    async with Node(config("solo", local_only=True)) as node:
        assert node.host is None and node.addrs == []
        assert node.card.peer_id == node.peer_id
        with pytest.raises(LocalProtocolError, match="local mode"):
            await node.find_peers()


async def test_identity_survives_restart_and_is_private(config: Config) -> None:
    cfg = config("same", local_only=True)
    async with Node(cfg) as first:
        peer_id = first.peer_id
    async with Node(cfg) as second:
        assert second.peer_id == peer_id
    mode = stat.S_IMODE(os.stat(cfg.data_dir / "identity.key").st_mode)
    assert mode == 0o600


async def test_card_content_change_triggers_reannounce(config: Config) -> None:
    async with Node(config("a")) as a, Node(config("b")) as b:
        await b.connect(a.addrs[0])
        await a.announce()
        a.announcer.set_models([CachedModel("fresh@2", "ef" * 32)])
        with trio.fail_after(10):
            await a.announcer.next_announce()
        card = await b.card_of(a.peer_id, refresh=True)
        assert card is not None and card.has_model("fresh")
