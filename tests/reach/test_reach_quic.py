"""QUIC next to TCP between real py-libp2p nodes on 127.0.0.1 (one process).

Nodes that share only QUIC find each other's cards, pull a verified model and run a
sharded generation over QUIC connections (no direct lane, so shard traffic rides them).
The bounds of :mod:`p2pedge.reach.quic` hold: a stream's reader that does not read holds
at most one window and loses nothing (aioquic alone would keep granting credit and
py-libp2p drop what overflows), a peer holds at most ``max_streams`` streams at once yet
may open as many again in turn, garbage datagrams end nothing, and a node listening on
both transports dials a peer's TCP address first.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio

from p2pedge.errors import ConfigError
from p2pedge.ids import ModelId
from p2pedge.models.keys import generate_key, public_key_hex
from p2pedge.node.config import NodeConfig, PrivateSwarm, ServeSpec
from p2pedge.node.models import TOKENIZER_FILES
from p2pedge.node.node import Node
from p2pedge.protocols._stream import FramedStream
from p2pedge.reach.quic import LIMITS, host_options, is_quic
from p2pedge.testing.tiny import build_tiny_model

QUIC = ("/ip4/127.0.0.1/udp/0/quic-v1",)
BOTH = ("/ip4/127.0.0.1/tcp/0", *QUIC)
MODEL = ModelId("tiny", "1")
PROTO = "/p2pedge/test-quic/1.0.0"


def transports(node: Node) -> set[str]:
    """The muxer class of each of ``node``'s live connections (yamux on TCP, QUIC)."""
    conns = node.network.host.get_network().get_connections()
    return {type(conn.muxed_conn).__name__ for conn in conns}


def quic_addr(node: Node) -> str:
    return next(addr for addr in node.addrs if is_quic(addr))


async def test_nodes_that_share_only_quic_pull_and_generate_over_it(
    tmp_path: Path, config: Callable[..., NodeConfig]
) -> None:
    model_dir = build_tiny_model(tmp_path / "tiny", seed=5, n_layers=4)
    with trio.fail_after(90):  # a stream-limit stall shows up as minutes
        sharded, local, cards, servers = await pull_and_generate(model_dir, tmp_path, config)
    assert list(sharded.route) == [f"{servers[0]}:0-2", f"{servers[1]}:2-4"]
    assert sharded.token_ids == local.token_ids and len(local.token_ids) == 6
    assert all(is_quic(a) for a in cards[servers[0]].addrs)  # the card names QUIC


async def pull_and_generate(
    model_dir: Path, tmp_path: Path, config: Callable[..., NodeConfig]
) -> tuple[Any, Any, dict[str, Any], tuple[str, str]]:
    key = generate_key()
    trusted = tmp_path / "publisher.pub"
    trusted.write_text(public_key_hex(key))
    async with Node(config("publisher", listen=QUIC)) as publisher:
        assert [is_quic(a) for a in publisher.addrs] == [True]
        await publisher.publish(model_dir, str(MODEL), key)
        boot = (publisher.addrs[0],)

        def server(name: str, span: str) -> NodeConfig:
            serve = (ServeSpec.parse(f"{MODEL}:{span}"),)
            settings = {"bootstrap": boot, "trusted_publishers": (trusted,), "serve": serve}
            # no direct lane (a raw TCP port): shard traffic rides the QUIC connections
            return config(name, listen=QUIC, direct_lane=None, **settings)

        async with Node(server("first", "0-2")) as first, Node(server("last", "2-4")) as last:
            settings = {"bootstrap": boot, "trusted_publishers": (trusted,), "listen": QUIC}
            async with Node(config("client", direct_lane=None, **settings)) as client:
                await client.pull(str(MODEL), files=list(TOKENIZER_FILES))
                sharded = await client.complete(
                    MODEL.name, prompt="a tiny prompt", max_tokens=6, temperature=0, route="sharded"
                )
                cards = {card.peer_id: card for card in await client.find_peers()}
                assert transports(client) == {"QUICConnection"}
            assert transports(first) == transports(last) == {"QUICConnection"}
        local = await publisher.complete(
            MODEL.name, prompt="a tiny prompt", max_tokens=6, temperature=0, route="local"
        )
    return sharded, local, cards, (first.peer_id, last.peer_id)


def aioquic_stream(stream: FramedStream) -> Any:
    """The aioquic stream under a framed libp2p stream on a QUIC connection."""
    quic_stream: Any = stream.stream.muxed_stream  # type: ignore[attr-defined]
    return quic_stream._connection._quic._streams[quic_stream._stream_id]


async def test_a_reader_that_does_not_read_holds_one_window_and_loses_nothing(
    config: Callable[..., NodeConfig],
) -> None:
    window = LIMITS.stream_window
    payload = os.urandom(window + window // 2)
    release, got = trio.Event(), trio.Event()
    received: list[bytes] = []
    held: list[int] = []

    async def slow_reader(stream: FramedStream, peer_id: str) -> None:
        await release.wait()
        quic_stream: Any = stream.stream.muxed_stream  # type: ignore[attr-defined]
        held.append(len(quic_stream._receive_buffer) + len(aioquic_stream(stream).receiver._buffer))
        received.append(await stream.receive_bytes())
        got.set()

    async with Node(config("reader", listen=QUIC)) as reader:
        reader.set_stream_handler(PROTO, slow_reader)
        async with Node(config("writer", listen=QUIC)) as writer:
            peer = await writer.connect(quic_addr(reader))
            stream = await writer.open_stream(peer, PROTO)
            sender = aioquic_stream(stream)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(stream.send_bytes, payload)
                with trio.fail_after(60):  # the writer stalls on the credit the reader gave
                    while not (sender.sender.highest_offset >= sender.max_stream_data_remote):
                        await trio.sleep(0.01)
                assert sender.max_stream_data_remote == window  # no credit without reads
                release.set()
                with trio.fail_after(60):
                    await got.wait()
            await stream.close()
    assert held and held[0] <= window
    assert received == [payload]  # nothing dropped


async def test_garbage_datagrams_end_nothing(config: Callable[..., NodeConfig]) -> None:
    garbage = [
        b"",
        os.urandom(1),
        os.urandom(1200),
        bytes([0xC0]) + os.urandom(40),  # a long header with nonsense after it
        bytes([0xC3, 0, 0, 0, 1, 20]) + os.urandom(1400),  # an Initial with a bad cid
        bytes([0x40]) + os.urandom(60),  # a short header for no known connection
        os.urandom(65000),
    ]
    async with Node(config("target", listen=QUIC)) as target:
        host, port = quic_addr(target).split("/")[2], int(quic_addr(target).split("/")[4])
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            for datagram in garbage * 20:
                udp.sendto(datagram, (host, port))
        async with Node(config("honest", listen=QUIC)) as honest:
            assert await honest.connect(quic_addr(target)) == target.peer_id
            assert target.peer_id in {card.peer_id for card in await honest.find_peers()}


async def test_a_node_on_both_transports_dials_tcp_first_and_quic_when_alone(
    config: Callable[..., NodeConfig],
) -> None:
    async with (
        Node(config("both", listen=BOTH)) as both,
        Node(config("dialer", listen=BOTH)) as dialer,
        Node(config("quic_only", listen=QUIC)) as quic_only,
    ):
        # each learns the other's addresses (both kinds) and dials by peer id
        await dialer.network.introduce(both.peer_id, both.addrs)
        await dialer.network.introduce(quic_only.peer_id, quic_only.addrs)
        await (await dialer.open_stream(both.peer_id, "/ipfs/id/1.0.0")).close()
        assert transports(dialer) == {"Yamux"}
        await (await dialer.open_stream(quic_only.peer_id, "/ipfs/id/1.0.0")).close()
        assert transports(dialer) == {"Yamux", "QUICConnection"}


async def test_a_peer_holds_at_most_max_streams_at_once_and_may_open_more_in_turn(
    config: Callable[..., NodeConfig],
) -> None:
    from libp2p.custom_types import TProtocol
    from libp2p.host.exceptions import StreamFailure
    from libp2p.peer.id import ID

    cap = LIMITS.max_streams
    release = trio.Event()
    opened: list[FramedStream] = []
    refused: list[StreamFailure] = []

    async def holder(stream: FramedStream, peer_id: str) -> None:
        opened.append(stream)
        await release.wait()

    async with Node(config("holder", listen=QUIC)) as target:
        target.set_stream_handler(PROTO, holder)
        async with Node(config("greedy", listen=QUIC)) as greedy:
            peer = await greedy.connect(quic_addr(target))
            (conn,) = greedy.network.host.get_network().get_connections(ID.from_base58(peer))
            conn.muxed_conn.MAX_OUTGOING_STREAMS = 10 * cap  # a peer ignoring its own cap
            host, protocols = greedy.network.host, [TProtocol(PROTO)]

            async def open_one() -> None:
                try:
                    await host.new_stream(ID.from_base58(peer), protocols)
                except StreamFailure as exc:  # the negotiation of a blocked stream times out
                    refused.append(exc)

            async with trio.open_nursery() as nursery:
                for _ in range(cap + 1):
                    nursery.start_soon(open_one)
                with trio.fail_after(60):  # (identify may hold a stream of the cap)
                    while len(opened) < cap - 2:
                        await trio.sleep(0.01)
                with trio.move_on_after(3):  # time for more to open, if they could
                    while len(opened) <= cap:
                        await trio.sleep(0.01)
                (target_conn,) = target.network.host.get_network().get_connections()
                assert cap - 2 <= len(opened) < cap + 1
                assert len(target_conn.muxed_conn._quic._streams) <= cap
                nursery.cancel_scope.cancel()  # (resetting a stream it may not open yet
                # breaks QUIC: the holder closes that connection, and the greedy redials)
            release.set()  # streams end, and the peer may open as many again
            held = len(opened)
            connections = set()
            with trio.fail_after(60):
                for _ in range(2 * cap):
                    stream = await greedy.open_stream(peer, PROTO)
                    connections.add(id(stream.stream.muxed_conn))  # type: ignore[attr-defined]
                    await stream.close()
            assert len(opened) == held + 2 * cap
            assert len(connections) == 1  # never stalled into a redial: credit came back


def test_quic_is_refused_to_a_private_swarm_and_absent_unless_listed() -> None:
    with pytest.raises(ConfigError, match="private swarm"):
        host_options(QUIC, private=True)
    with pytest.raises(ConfigError, match="private swarm"):  # already at configuration
        NodeConfig(listen=QUIC, private=PrivateSwarm(psk_file=Path("swarm.key")))
    assert host_options(("/ip4/127.0.0.1/tcp/0",), private=True) == {}
    assert host_options(QUIC)["enable_quic"] is True
