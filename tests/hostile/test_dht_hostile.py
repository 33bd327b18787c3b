"""A strict DHT against hostile peers: real nodes over loopback, raw Kademlia messages.

Each attack checks three things: the refusal is the typed one (counted by limit on the
victim's DHT, or raised where the validator is called directly), what the victim holds
stays bounded, and the victim still serves honest peers afterwards.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
import trio
import varint  # type: ignore[import-untyped]
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.custom_types import TProtocol
from libp2p.kad_dht.common import MAX_DHT_MESSAGE_SIZE
from libp2p.kad_dht.pb.kademlia_pb2 import Message, Record
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from libp2p.records.record import make_signed_put_record
from libp2p.utils.varint import read_varint_prefixed_bytes_limited
from multiaddr import Multiaddr

from p2pedge.dht._protocol import P2PEDGE_KAD_PROTOCOL
from p2pedge.dht.limits import PROVIDER_KEY_PREFIX, DhtLimits
from p2pedge.dht.strict import (
    BoundedProviderStore,
    BoundedValueStore,
    PeerRate,
    StrictKadDHT,
    StrictValidator,
    card_namespace,
    sender,
)
from p2pedge.errors import Busy, InvalidRecord
from p2pedge.node.config import NodeConfig
from p2pedge.node.node import Node
from p2pedge.planning.routes import CostModel, choose_route, options_from_cards
from p2pedge.records.card import (
    MAX_CARD_BYTES,
    MAX_CLAIMED_GFLOPS,
    CapabilityCard,
    ServedLayers,
    card_key,
    sign_card,
)
from p2pedge.records.peer_ids import peer_id_from_ed25519
from p2pedge.wire.messages import pack

Config = Callable[..., NodeConfig]
YEAR_S = 365 * 24 * 3600.0
MB = 1_000_000


def quiet(config: Config, name: str) -> NodeConfig:
    """A node that announces only when told, so no PUT but the test's reaches a victim."""
    return config(name, announce_on_start=False)


def dht_of(node: Node) -> StrictKadDHT:
    assert node.directory is not None
    dht = node.directory.dht
    assert isinstance(dht, StrictKadDHT)
    return dht


def signed(node: Node, **changes: Any) -> bytes:
    """``node``'s own card with ``changes``, signed by its key: a peer may sign anything,
    so this bypasses sign_card's checks the way a hostile peer would."""
    card = dataclasses.replace(node.card, **changes)
    body = pack(
        {**card.content(), "issued_at": card.issued_at, "expires_at": card.expires_at, "v": 1}
    )
    return pack({"body": body, "sig": node.identity.private_key.sign(body)})


async def put(attacker: Node, victim: Node, key: bytes, value: bytes) -> bool:
    """One PUT_VALUE on a fresh stream, as the attacker's own signed record."""
    record = make_signed_put_record(key, value, attacker.host.get_private_key())
    store = dht_of(attacker).value_store
    return bool(await store._store_at_peer(victim.host.get_id(), key, value, record))


async def pipelined(attacker: Node, victim: Node, messages: list[Message]) -> int:
    """Write every message on one Kademlia stream at once, then count the replies until
    the victim resets the stream (what it does on a refusal) or all are answered."""
    stream = await attacker.host.new_stream(victim.host.get_id(), [TProtocol(P2PEDGE_KAD_PROTOCOL)])
    frames = [m.SerializeToString() for m in messages]
    await stream.write(b"".join(varint.encode(len(f)) + f for f in frames))
    replies = 0
    with trio.fail_after(20):
        while replies < len(messages):
            try:
                await read_varint_prefixed_bytes_limited(stream, MAX_DHT_MESSAGE_SIZE)
            except Exception:  # the reset arrives as one of several py-libp2p errors
                break
            replies += 1
    await stream.reset()
    return replies


def put_message(attacker: Node, key: bytes, value: bytes) -> Message:
    message = Message()
    message.type = Message.MessageType.PUT_VALUE
    message.key = key
    message.record.CopyFrom(make_signed_put_record(key, value, attacker.host.get_private_key()))
    return message


def add_provider_message(attacker: Node, key: bytes) -> Message:
    message = Message()
    message.type = Message.MessageType.ADD_PROVIDER
    message.key = key
    provider = message.providerPeers.add()
    provider.id = attacker.host.get_id().to_bytes()
    provider.addrs.extend(a.to_bytes() for a in attacker.host.get_addrs())
    return message


def held_values(node: Node) -> dict[bytes, bytes]:
    return {k: r.value for k, (r, _) in dht_of(node).value_store.store.items()}


async def still_serves(victim: Node, honest: Node) -> None:
    """(a): an honest peer's card lands on the victim and the victim finds it."""
    dht_of(victim).refused.clear()
    assert await put(
        honest, victim, card_key(honest.peer_id).encode(), honest.announcer.record or b""
    )
    assert not dht_of(victim).refused
    found = {c.peer_id: c for c in await victim.find_peers()}
    assert found[honest.peer_id].issued_at == honest.card.issued_at


async def test_junk_namespaces_and_oversize_values_are_refused(config: Config) -> None:
    async with Node(quiet(config, "victim")) as victim, Node(quiet(config, "attacker")) as attacker:
        async with Node(quiet(config, "honest")) as honest:
            for node in (attacker, honest):
                await node.connect(victim.addrs[0])
            junk = [(b"/junk/%d" % i, os.urandom(MB)) for i in range(6)] + [
                (b"plain-key", os.urandom(MB)),
                (b"/pk/" + attacker.peer_id.encode(), os.urandom(1000)),
                (b"/ipns/" + attacker.peer_id.encode(), os.urandom(1000)),
                (b"/p2pcard/", os.urandom(1000)),
                # our own namespace, over its size limit
                (card_key(attacker.peer_id).encode(), os.urandom(MAX_CARD_BYTES + 1)),
            ]
            before = held_values(victim)
            for key, value in junk:
                assert not await put(attacker, victim, key, value), key
            # (c) typed refusals, one per PUT, each by the namespace gate
            assert dht_of(victim).refused == {"InvalidRecord": len(junk)}
            with pytest.raises(InvalidRecord, match="namespace"):
                dht_of(victim).validator.validate("/junk/0", b"x")
            with pytest.raises(InvalidRecord, match="exceeds"):
                dht_of(victim).validator.validate(card_key(attacker.peer_id), b"x" * 20000)
            # (b) nothing of it is held
            assert held_values(victim) == before
            await still_serves(victim, honest)


async def test_put_flood_is_rate_limited_and_honest_cards_still_land(config: Config) -> None:
    limits = DhtLimits()
    async with Node(quiet(config, "victim")) as victim, Node(quiet(config, "attacker")) as attacker:
        async with Node(quiet(config, "honest")) as honest:
            for node in (attacker, honest):
                await node.connect(victim.addrs[0])
            key = card_key(attacker.peer_id).encode()
            issued = attacker.card.issued_at
            flood = [
                put_message(attacker, key, signed(attacker, issued_at=issued + i * 1e-3))
                for i in range(1, 201)
            ]
            start = trio.current_time()
            accepted = await pipelined(attacker, victim, flood)
            elapsed = trio.current_time() - start
            allowed = limits.put_burst + elapsed * limits.put_rate
            assert limits.put_burst <= accepted <= allowed + 1
            assert dht_of(victim).refused["dht.put"] == 1  # the stream ends at the refusal
            # A fresh stream is refused too: the bucket is per peer, not per stream.
            assert await pipelined(attacker, victim, flood[-1:]) == 0
            # (b) one key held for the attacker, its newest accepted card
            attacker_held = held_values(victim)[key]
            assert attacker_held == flood[accepted - 1].record.value
            assert len(held_values(victim)) <= 3
            await still_serves(victim, honest)


async def test_provider_flood_and_foreign_provider_keys_are_refused(config: Config) -> None:
    limits = DhtLimits()
    async with Node(quiet(config, "victim")) as victim, Node(quiet(config, "attacker")) as attacker:
        async with Node(quiet(config, "honest")) as honest:
            for node in (attacker, honest):
                await node.connect(victim.addrs[0])
            store = dht_of(victim).provider_store
            # A key of another shape is refused (the echo is the library's, sent anyway).
            # (the right length without the multihash prefix, and a short key)
            shapes = [b"k" * 34, PROVIDER_KEY_PREFIX + b"k" * 16]
            await pipelined(attacker, victim, [add_provider_message(attacker, k) for k in shapes])
            assert not any(k in store.providers for k in shapes)
            assert dht_of(victim).refused == {"InvalidRecord": 2}
            flood = [
                add_provider_message(attacker, PROVIDER_KEY_PREFIX + os.urandom(32))
                for _ in range(1000)
            ]
            start = trio.current_time()
            accepted = await pipelined(attacker, victim, flood)
            elapsed = trio.current_time() - start
            allowed = limits.provider_burst + elapsed * limits.provider_rate
            assert limits.provider_burst - 1 <= accepted <= allowed + 1
            assert dht_of(victim).refused["dht.provider"] == 1
            mine = sum(
                1 for held in store.providers.values() if str(attacker.host.get_id()) in held
            )
            assert mine <= min(accepted, limits.max_provider_records_per_peer)
            # An honest provider still lands and is found.
            assert await honest.peers.provide("model/tiny")
            assert honest.peer_id in await victim.peers.find_providers("model/tiny")
            await still_serves(victim, honest)


@pytest.mark.parametrize(
    "claim",
    ["31-year lifetime", "just over the cap", "issued a day ahead"],
)
async def test_overlong_or_future_cards_are_refused(config: Config, claim: str) -> None:
    async with Node(quiet(config, "victim")) as victim, Node(quiet(config, "attacker")) as attacker:
        async with Node(quiet(config, "honest")) as honest:
            for node in (attacker, honest):
                await node.connect(victim.addrs[0])
            now = attacker.card.issued_at
            cap = dht_of(victim).limits.max_card_lifetime_s
            times = {
                "31-year lifetime": (now, now + 31 * YEAR_S),
                "just over the cap": (now, now + cap + 1),
                "issued a day ahead": (now + 86400, now + 86400 + 60),
            }[claim]
            record = signed(attacker, issued_at=times[0], expires_at=times[1])
            key = card_key(attacker.peer_id).encode()
            assert not await put(attacker, victim, key, record)
            assert dht_of(victim).refused == {"InvalidRecord": 1}
            assert held_values(victim).get(key) != record
            with pytest.raises(InvalidRecord, match=r"lifetime|future"):
                dht_of(victim).validator.validate(key.decode(), record)
            await still_serves(victim, honest)


async def test_implausible_compute_is_clamped_in_route_choice(config: Config) -> None:
    async with Node(quiet(config, "client")) as client:
        async with Node(quiet(config, "honest")) as honest, Node(quiet(config, "liar")) as liar:
            for node in (honest, liar):
                await node.connect(client.addrs[0])
            served = (ServedLayers("m@1", 0, 8),)
            honest_card = dataclasses.replace(
                honest.card, layers_served=served, compute_gflops=100.0, load=0.0
            )
            liar_card = dataclasses.replace(
                liar.card,
                layers_served=served,
                compute_gflops=1e9,
                load=0.0,
                accelerators=("NVIDIA H100",) * 8,
            )
            for node, card in ((honest, honest_card), (liar, liar_card)):
                record = sign_card(card, node.identity.private_key)
                assert await put(node, client, card_key(node.peer_id).encode(), record)
            cards: list[CapabilityCard] = []
            for node in (honest, liar):
                card = await client.card_of(node.peer_id, refresh=True)
                assert card is not None
                cards.append(card)
            assert cards[1].compute_gflops == MAX_CLAIMED_GFLOPS  # clamped at decode
            rtts = {honest.peer_id: 0.001, liar.peer_id: 0.75}
            options = options_from_cards(cards, "m@1", rtts)
            cost = CostModel(gflop_per_block_token=10.0)
            route = choose_route(options, 8, cost=cost)
            assert [h.peer_id for h in route] == [honest.peer_id]
            # Believed as claimed, the liar would have won the route.
            believing = dataclasses.replace(cost, max_gflops=1e12, claim_spread=1e12)
            raw = [
                dataclasses.replace(o, compute_gflops=1e9) if o.peer_id == liar.peer_id else o
                for o in options
            ]
            assert [h.peer_id for h in choose_route(raw, 8, cost=believing)] == [liar.peer_id]


def fresh_card(now: float, lifetime: float = 180.0) -> tuple[str, bytes]:
    """A valid card of a newly minted peer id: its DHT key and signed record."""
    key = Ed25519PrivateKey.generate()
    public = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    peer = peer_id_from_ed25519(public)
    card = CapabilityCard(
        peer, public, (), "0", "linux", "x86_64", 2, 1 << 30, 1 << 29, (), (), 10.0, (), (),
        0.0, now, now + lifetime,
    )  # fmt: skip
    return card_key(peer), sign_card(card, key)


def strict_validator(now: list[float], limits: DhtLimits) -> StrictValidator:
    cards = card_namespace(lambda: now[0], limits.max_card_lifetime_s)
    rate = PeerRate("dht.put", limits.put_rate, limits.put_burst, limits.source_share)
    return StrictValidator({cards.name: cards}, rate, lambda: now[0])


def test_put_rate_is_per_peer_and_minted_ids_share_their_address() -> None:
    now = [time.time()]
    validator = strict_validator(now, DhtLimits(put_rate=1.0, put_burst=3, source_share=2))
    records = [fresh_card(now[0]) for _ in range(8)]
    with sender("peer-a", "10.0.0.1"):
        for key, record in records[:3]:
            validator.validate(key, record)
        with pytest.raises(Busy) as refused:
            validator.validate(*records[3])
        assert (refused.value.limit, refused.value.scope) == ("dht.put", "peer")
    with sender("peer-b", "10.0.0.1"):  # a second id from the same address: 3 more
        for key, record in records[3:6]:
            validator.validate(key, record)
    with sender("peer-c", "10.0.0.1"), pytest.raises(Busy) as refused:
        validator.validate(*records[6])  # the address has had its 2 peers' worth
    assert (refused.value.limit, refused.value.scope) == ("dht.put", "source")
    with sender("peer-d", "10.0.0.2"):  # another address is unaffected
        validator.validate(*records[6])
    now[0] += 1.0  # one second refills one PUT for peer-a and its address
    with sender("peer-a", "10.0.0.1"):
        validator.validate(*records[7])
    assert validator.refused == {"dht.put": 2}


def test_value_store_refuses_new_keys_when_full_and_never_evicts() -> None:
    now = [time.time()]
    validator = strict_validator(now, DhtLimits())
    store = BoundedValueStore(None, None, validator, limit=2)
    cards = [fresh_card(now[0], lifetime=60.0 * (i + 1)) for i in range(3)]

    def record(key: str, value: bytes) -> Record:
        rec = Record()
        rec.key, rec.value = key.encode(), value
        return rec

    for key, value in cards[:2]:
        store.put_record(key.encode(), record(key, value))
    with sender("peer-a", "10.0.0.1"), pytest.raises(Busy) as refused:
        store.put_record(cards[2][0].encode(), record(*cards[2]))
    assert (refused.value.limit, refused.value.scope) == ("dht.values", "total")
    store.put_record(cards[2][0].encode(), record(*cards[2]))  # our own lookup: not cached
    assert set(store.store) == {cards[0][0].encode(), cards[1][0].encode()}
    assert validator.refused == {"dht.values": 2}
    store.put_record(cards[0][0].encode(), record(*cards[0]))  # an update still lands
    # A value lapses with its card, not a day later.
    assert store.store[cards[1][0].encode()][1] == pytest.approx(now[0] + 120.0)


def test_provider_store_caps_each_peer_and_the_total() -> None:
    def peer() -> PeerInfo:
        pid = ID.from_pubkey(create_new_key_pair().public_key)
        return PeerInfo(pid, [Multiaddr("/ip4/10.0.0.1/tcp/1")])

    own, a, b = peer(), peer(), peer()

    class Host:
        def get_id(self) -> ID:
            return own.peer_id

    limits = DhtLimits(max_provider_records=5, max_provider_records_per_peer=3)
    store = BoundedProviderStore(Host(), None, limits, Counter())
    keys = [PROVIDER_KEY_PREFIX + os.urandom(32) for _ in range(8)]
    with sender(str(a.peer_id), "10.0.0.1"):
        for key in keys[:3]:
            store.add_provider(key, a)
        store.add_provider(keys[0], a)  # a refresh is not a new record
        with pytest.raises(Busy) as refused:
            store.add_provider(keys[3], a)
        assert (refused.value.limit, refused.value.scope) == ("dht.providers", "peer")
    with sender(str(b.peer_id), "10.0.0.2"):
        for key in keys[3:5]:
            store.add_provider(key, b)
        with pytest.raises(Busy) as refused:
            store.add_provider(keys[5], b)
        assert refused.value.scope == "total"
        with pytest.raises(InvalidRecord):
            store.add_provider(b"x" * 32, b)
    store.add_provider(keys[6], b)  # learned by our own lookup: not cached, no error
    for key in keys:  # our own records are never refused
        store.add_provider(key, own)
    assert sum(len(held) for held in store.providers.values()) == 5 + len(keys)
