"""The relay role's limits and the client's checks, on loopback with real hosts.

A hostile relay's replies end the reservation attempt with a typed error, never more;
a relay lends only as many slots as its policy says, and only to the peer that asks.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import AsyncExitStack
from typing import Any

import pytest
import trio
from libp2p.custom_types import TProtocol
from libp2p.relay.circuit_v2.pb.circuit_pb2 import HopMessage, PeerId, Reservation, Status
from libp2p.relay.circuit_v2.protocol import PROTOCOL_ID
from libp2p.utils.varint import encode_varint_prefixed, read_varint_prefixed_bytes_limited

from p2pedge.errors import ConfigError, PeerUnavailable, RemoteProtocolError
from p2pedge.node.config import NodeConfig
from p2pedge.node.node import Node
from p2pedge.reach.client import ReservationKeeper, dial_relayed, reserve
from p2pedge.reach.punch import connection_kinds
from p2pedge.reach.relay import RelayPolicy, accept_relayed, relay_service

Config = Callable[..., NodeConfig]


def quiet(config: Config, name: str) -> NodeConfig:
    return config(name, announce_on_start=False)


def hop(message: HopMessage) -> bytes:
    return bytes(encode_varint_prefixed(message.SerializeToString()))


def status(code: int, **fields: Any) -> bytes:
    return hop(HopMessage(type=HopMessage.STATUS, status=code, **fields))


FAULTY_REPLIES = {
    "not a status": hop(HopMessage(type=HopMessage.CONNECT)),
    "ok without a reservation": status(Status.OK),
    "expired reservation": status(Status.OK, reservation=Reservation(expire=1)),
    "garbage protobuf": bytes(encode_varint_prefixed(b"\xff\xff\xff")),
    "oversized length": b"\x80\x80\x80\x01",  # 2 MiB announced: refused before reading
}


@pytest.mark.parametrize("reply", sorted(FAULTY_REPLIES))
async def test_faulty_relay_reply_is_a_protocol_error(config: Config, reply: str) -> None:
    async with Node(quiet(config, "relay")) as relay, Node(quiet(config, "me")) as me:

        async def faulty_relay(stream: Any) -> None:
            await stream.write(FAULTY_REPLIES[reply])
            await stream.close()

        relay.host.set_stream_handler(TProtocol(PROTOCOL_ID), faulty_relay)
        with pytest.raises(RemoteProtocolError):
            await reserve(me.host, relay.addrs[0], timeout=5)


async def test_refusal_is_peer_unavailable(config: Config) -> None:
    async with Node(quiet(config, "relay")) as relay, Node(quiet(config, "me")) as me:

        async def full_relay(stream: Any) -> None:
            await stream.write(status(Status.RESOURCE_LIMIT_EXCEEDED))
            await stream.close()

        relay.host.set_stream_handler(TProtocol(PROTOCOL_ID), full_relay)
        with pytest.raises(PeerUnavailable, match="RESOURCE_LIMIT_EXCEEDED"):
            await reserve(me.host, relay.addrs[0], timeout=5)


async def test_relay_lends_at_most_its_reservations(config: Config) -> None:
    async with AsyncExitStack() as stack:
        relay = await stack.enter_async_context(Node(quiet(config, "relay")))
        await stack.enter_async_context(relay_service(relay.host, RelayPolicy(max_reservations=1)))
        first = await stack.enter_async_context(Node(quiet(config, "first")))
        second = await stack.enter_async_context(Node(quiet(config, "second")))
        granted = await reserve(first.host, relay.addrs[0], timeout=5)
        assert granted.expires_at > time.time()
        assert granted.addrs[0] == f"{relay.addrs[0]}/p2p-circuit/p2p/{first.peer_id}"
        with pytest.raises(PeerUnavailable, match="RESOURCE_LIMIT_EXCEEDED"):
            await reserve(second.host, relay.addrs[0], timeout=5)
        # renewing the one slot it holds is fine
        assert (await reserve(first.host, relay.addrs[0], timeout=5)).relay == relay.peer_id


async def test_a_peer_cannot_reserve_in_another_peers_name(config: Config) -> None:
    """py-libp2p's relay would reserve for the id in RESERVE's ``peer`` field; ours
    reserves for the connection's own peer, so B gets no slot that B never asked for."""
    async with AsyncExitStack() as stack:
        relay = await stack.enter_async_context(Node(quiet(config, "relay")))
        await stack.enter_async_context(relay_service(relay.host))
        nodes = [await stack.enter_async_context(Node(quiet(config, n))) for n in "abm"]
        a, b, mallory = nodes
        await stack.enter_async_context(accept_relayed(b.host))
        await b.connect(relay.addrs[0])  # B is reachable from the relay, but reserved nothing
        await mallory.connect(relay.addrs[0])
        stream = await mallory.host.new_stream(relay.host.get_id(), [TProtocol(PROTOCOL_ID)])
        spoof = HopMessage(type=HopMessage.RESERVE, peer=PeerId(id=b.host.get_id().to_bytes()))
        await stream.write(hop(spoof))
        with trio.fail_after(5):
            answer = HopMessage()
            answer.ParseFromString(await read_varint_prefixed_bytes_limited(stream, 4096))
        assert answer.status == Status.OK  # a reservation, but Mallory's own
        circuit = f"{relay.addrs[0]}/p2p-circuit/p2p/{b.peer_id}"
        with pytest.raises(PeerUnavailable, match="NO_RESERVATION"):
            await dial_relayed(a.host, circuit, timeout=5)
        # once B reserves itself, the same dial goes through
        await reserve(b.host, relay.addrs[0], timeout=5)
        assert await dial_relayed(a.host, circuit, timeout=5) == b.peer_id
        assert connection_kinds(a.host, b.peer_id) == ["relayed"]


def test_relay_policy_rejects_nonsense() -> None:
    with pytest.raises(ConfigError):
        RelayPolicy(circuit_bytes=0)
    with pytest.raises(ConfigError):
        RelayPolicy(max_reservations=-1)


async def test_keeper_advertises_only_relays_that_granted_a_slot(config: Config) -> None:
    async with AsyncExitStack() as stack:
        good = await stack.enter_async_context(Node(quiet(config, "good")))
        await stack.enter_async_context(relay_service(good.host))
        full = await stack.enter_async_context(Node(quiet(config, "full")))

        async def full_relay(stream: Any) -> None:
            await stream.write(status(Status.RESERVATION_REFUSED))
            await stream.close()

        full.host.set_stream_handler(TProtocol(PROTOCOL_ID), full_relay)
        me = await stack.enter_async_context(Node(quiet(config, "me")))
        seen: list[tuple[str, ...]] = []
        keeper = ReservationKeeper(me.host, [full.addrs[0], good.addrs[0]], seen.append)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(keeper.run)
            with trio.fail_after(10):
                await keeper.changed.wait()
            nursery.cancel_scope.cancel()
        assert seen == [(f"{good.addrs[0]}/p2p-circuit/p2p/{me.peer_id}",)]
