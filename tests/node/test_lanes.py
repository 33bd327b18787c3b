"""Direct lanes between real nodes: used when offered, libp2p otherwise, never a way around
the node's admission rules."""

from __future__ import annotations

import socket
from collections.abc import Callable

import pytest

from p2pedge.errors import ConfigError, PeerUnavailable
from p2pedge.node.config import NodeConfig, PrivateSwarm
from p2pedge.node.lanes import lane_host
from p2pedge.node.node import Node
from p2pedge.protocols._stream import FramedStream
from p2pedge.protocols.direct.handler import SealedStream
from p2pedge.protocols.direct.tls import fingerprint

Config = Callable[..., NodeConfig]
PROTO = "/test/echo/1.0.0"


async def echo(stream: FramedStream, peer_id: str) -> None:
    while True:
        payload = await stream.receive_bytes()
        await stream.send_bytes(peer_id.encode() + b":" + payload)


async def serve_echo(node: Node) -> None:
    node.set_stream_handler(PROTO, echo)
    await node.lanes.serve(PROTO, echo)


async def test_lane_is_used_when_offered_and_knows_the_caller(config: Config) -> None:
    async with Node(config("a")) as a, Node(config("b")) as b:
        await serve_echo(a)
        await b.connect(a.addrs[0])
        stream = await b.lanes.open(a.peer_id, PROTO, timeout=5)
        assert isinstance(stream, SealedStream)
        assert stream.channel.version() == "TLSv1.3"
        tls = stream.channel._tls  # the certificate b saw is a's lane certificate
        assert a.lanes.server is not None and a.lanes.server.identity is not None
        seen = tls.getpeercert(binary_form=True)
        assert seen is not None and fingerprint(seen) == a.lanes.server.identity.fingerprint
        await stream.send_bytes(b"h" * 70_000)
        assert await stream.receive_bytes(timeout=5) == f"{b.peer_id}:".encode() + b"h" * 70_000
        assert b.lanes.opened == 1 and b.lanes.fallbacks == 0
        assert a.lanes.server is not None and a.lanes.server.accepted == 1
    # leaving both nodes with the lane still open is a clean exit


async def test_peer_without_a_lane_is_reached_over_libp2p(config: Config) -> None:
    async with Node(config("a", direct_lane=None)) as a, Node(config("b")) as b:
        await serve_echo(a)
        assert a.lanes.server is None
        await b.connect(a.addrs[0])
        for _ in range(2):
            stream = await b.lanes.open(a.peer_id, PROTO, timeout=5)
            assert not isinstance(stream, SealedStream)
            await stream.send_bytes(b"plain")
            assert await stream.receive_bytes(timeout=5) == f"{b.peer_id}:plain".encode()
            await stream.close()
        assert (b.lanes.opened, b.lanes.fallbacks) == (0, 1)  # the miss is remembered


async def test_lane_does_not_bypass_the_allow_list(config: Config) -> None:
    async with Node(config("b")) as b:
        async with Node(
            config("a", private=PrivateSwarm(allow_peers=("12D3KooWSomeoneElse",)))
        ) as a:
            await serve_echo(a)
            await b.connect(a.addrs[0])
            with pytest.raises(PeerUnavailable):
                await b.lanes.open(a.peer_id, PROTO, timeout=3)
            assert a.lanes.server is not None and a.lanes.server.accepted == 0


async def test_lane_port_is_configurable_and_a_taken_port_is_a_clear_error(
    config: Config,
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        async with Node(config("a", direct_lane=port)) as a:
            with pytest.raises(ConfigError, match="direct lane"):
                await a.lanes.serve(PROTO, echo)
            assert a.lanes.server is None
    with pytest.raises(ConfigError):
        config("b", direct_lane=70000)


def test_lane_listens_where_libp2p_listens() -> None:
    assert lane_host(("/ip4/10.0.0.7/tcp/4001",)) == "10.0.0.7"
    assert lane_host(("/ip6/::1/tcp/0",)) == "::1"
    assert lane_host(("/dns4/example.com/tcp/1",)) == "127.0.0.1"
