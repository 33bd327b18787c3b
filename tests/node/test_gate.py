"""The allow-list gate keeps unlisted peers out of everything a node serves.

Node's own stream handlers check the allow-list themselves; Kademlia and identify are
py-libp2p's, so the gate is all that stands between an unlisted peer and them.
"""

import contextlib
from collections.abc import Callable

import pytest
import trio
from libp2p.abc import INotifee
from libp2p.identity.identify.identify import ID as IDENTIFY
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from libp2p.records.record import make_signed_put_record

from p2pedge.node.config import NodeConfig, PrivateSwarm
from p2pedge.node.gate import AllowListGate
from p2pedge.node.node import Node
from p2pedge.protocols._stream import FramedStream
from p2pedge.records.card import card_key

Config = Callable[..., NodeConfig]


async def identify_of(host: object, target: ID) -> bytes:
    """Run identify against ``target`` from ``host``; the raw reply (may be empty)."""
    stream = await host.new_stream(target, [IDENTIFY])  # type: ignore[attr-defined]
    with trio.fail_after(5):
        reply = await stream.read()
    await stream.close()
    return bytes(reply)


async def try_identify(node: Node, target: Node) -> bytes:
    """Dial and run identify as an unlisted peer would; empty when refused."""
    try:
        await dial(node, target)
        return await identify_of(node.host, target.host.get_id())
    except Exception:  # refused: py-libp2p reports a reset or closed connection many ways
        return b""


async def store_own_card(node: Node, target: Node) -> bool:
    """PUT ``node``'s own signed card at ``target`` over Kademlia; True when acknowledged."""
    assert node.directory is not None and node.announcer.record is not None
    key = card_key(node.peer_id).encode()
    record = make_signed_put_record(key, node.announcer.record, node.host.get_private_key())
    store = node.directory.dht.value_store
    return bool(
        await store._store_at_peer(target.host.get_id(), key, node.announcer.record, record)
    )


async def echo(stream: FramedStream, peer: str) -> None:
    await stream.send({"echo": (await stream.receive())["n"]})


async def dial(node: Node, target: Node) -> None:
    """Dial at the transport level: a raw peer, not a Node that would honour lists."""
    info = PeerInfo(target.host.get_id(), list(target.host.get_addrs()))
    node.host.get_peerstore().add_addrs(info.peer_id, info.addrs, 60)
    await node.host.connect(info)


class Closed(INotifee):  # type: ignore[misc]
    """Sets ``event`` when a connection from ``peer`` goes away."""

    def __init__(self, peer: ID) -> None:
        self.peer = peer
        self.event = trio.Event()

    async def disconnected(self, network: object, conn: object) -> None:
        if conn.muxed_conn.peer_id == self.peer:  # type: ignore[attr-defined]
            self.event.set()

    async def connected(self, network: object, conn: object) -> None:
        return None

    async def opened_stream(self, network: object, stream: object) -> None:
        return None

    async def closed_stream(self, network: object, stream: object) -> None:
        return None

    async def listen(self, network: object, multiaddr: object) -> None:
        return None

    async def listen_close(self, network: object, multiaddr: object) -> None:
        return None


def without_connection_gate(node: Node) -> None:
    """Unregister the connection gate: what an unlisted peer meets in the moment
    between its connection coming up and the gate closing it."""
    network = node.host.get_network()
    gates = [n for n in network.notifees if isinstance(n, AllowListGate)]
    assert gates
    for gate in gates:
        network.notifees.remove(gate)


async def assert_served(listed: Node, gated: Node) -> None:
    stream = await listed.open_stream(gated.peer_id, "/test/echo/1")
    await stream.send({"n": 3})
    assert await stream.receive(timeout=5) == {"echo": 3}


async def test_listed_peer_runs_identify_and_stores_its_card(config: Config) -> None:
    """The control: what the outsider is refused, a listed peer is given."""
    async with Node(config("listed")) as listed:
        async with Node(
            config("gated", private=PrivateSwarm(allow_peers=(listed.peer_id,)))
        ) as gated:
            assert gated.directory is not None
            await listed.connect(gated.addrs[0])
            assert await identify_of(listed.host, gated.host.get_id())
            assert await store_own_card(listed, gated)
            assert gated.directory.dht.value_store.get(card_key(listed.peer_id).encode())


async def test_gate_closes_an_unlisted_peers_connection(config: Config) -> None:
    async with Node(config("listed")) as listed, Node(config("outsider")) as outsider:
        async with Node(
            config("gated", private=PrivateSwarm(allow_peers=(listed.peer_id,)))
        ) as gated:
            gated.set_stream_handler("/test/echo/1", echo)
            closed = Closed(outsider.host.get_id())
            gated.host.get_network().register_notifee(closed)
            with contextlib.suppress(Exception):  # the dial may fail or succeed, then close
                await dial(outsider, gated)
            with trio.fail_after(5):
                await closed.event.wait()
            assert not gated.host.get_network().get_connections(outsider.host.get_id())
            await listed.connect(gated.addrs[0])
            await assert_served(listed, gated)


@pytest.mark.parametrize("gate", ["connection gate", "stream guard only"])
async def test_unlisted_peer_cannot_run_identify(config: Config, gate: str) -> None:
    async with Node(config("listed")) as listed, Node(config("outsider")) as outsider:
        async with Node(
            config("gated", private=PrivateSwarm(allow_peers=(listed.peer_id,)))
        ) as gated:
            gated.set_stream_handler("/test/echo/1", echo)
            if gate == "stream guard only":
                without_connection_gate(gated)
            assert not await try_identify(outsider, gated)
            await listed.connect(gated.addrs[0])
            await assert_served(listed, gated)


@pytest.mark.parametrize("gate", ["connection gate", "stream guard only"])
async def test_unlisted_peer_cannot_store_a_dht_record(config: Config, gate: str) -> None:
    async with Node(config("listed")) as listed, Node(config("outsider")) as outsider:
        async with Node(
            config("gated", private=PrivateSwarm(allow_peers=(listed.peer_id,)))
        ) as gated:
            gated.set_stream_handler("/test/echo/1", echo)
            assert gated.directory is not None
            if gate == "stream guard only":
                without_connection_gate(gated)
            with contextlib.suppress(Exception):
                await dial(outsider, gated)
            assert not await store_own_card(outsider, gated)
            held = gated.directory.dht.value_store
            assert held.get(card_key(outsider.peer_id).encode()) is None
            await listed.connect(gated.addrs[0])
            await assert_served(listed, gated)
