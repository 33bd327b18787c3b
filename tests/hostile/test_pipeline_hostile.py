"""Hostile peers against a real pipeline server node over loopback (py-libp2p on 127.0.0.1,
real onnxruntime): malformed peer ids, session hoarding from one or many peer ids, and
silent connections to the direct lane. Each test shows that the node still serves a
well-behaved client afterwards, that what the attacker holds stays within its quota, and
which typed error the attacker got."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import trio
import trio.testing

from p2pedge.errors import Busy, PeerUnavailable, RemoteProtocolError
from p2pedge.ids import LayerRange
from p2pedge.node.config import NodeConfig
from p2pedge.node.node import Node
from p2pedge.protocols._stream import FramedStream
from p2pedge.protocols.direct import codec as direct_codec
from p2pedge.protocols.direct.handler import SealedStream, open_direct
from p2pedge.protocols.direct.machine import LaneLimits
from p2pedge.protocols.pipeline import codec
from p2pedge.protocols.pipeline.connection import ShardConnection
from p2pedge.protocols.pipeline.handler import PipelineServer
from p2pedge.protocols.pipeline.limits import PipelineLimits
from p2pedge.protocols.pipeline.serving import start_pipeline_server
from p2pedge.quota import Limit
from p2pedge.records.peer_ids import peer_id_from_ed25519
from p2pedge.runtime.config import RuntimeConfig
from p2pedge.testing.tiny import build_tiny_model

Config = Callable[..., NodeConfig]
MODEL = "tiny"
WHOLE, FIRST = LayerRange(0, 4), LayerRange(0, 2)  # FIRST pushes its output on
TOKENS = np.array([[5, 17, 42]], np.int64)
NOBODY = peer_id_from_ed25519(bytes([9]) * 32)  # a well-formed peer id nobody runs
NOT_BASE58 = "12D3KooW0OIl"  # the audit's id: ID.from_base58 raised in the pusher's tasks


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / MODEL, seed=5, n_layers=4)


@asynccontextmanager
async def serving(
    config: Config,
    model_dir: Path,
    tmp_path: Path,
    *,
    limits: PipelineLimits | None = None,
    lane: LaneLimits | None = None,
) -> AsyncIterator[tuple[Node, PipelineServer]]:
    async with Node(config("server")) as node:
        if lane is not None:
            node.lanes.limits = lane
        server = await start_pipeline_server(
            node,
            [(MODEL, model_dir, WHOLE), (MODEL, model_dir, FIRST)],
            shards_root=tmp_path / "shards",
            runtime=RuntimeConfig(intra_op_threads=1),
            limits=limits,
        )
        yield node, server


class Raw:
    """A hostile client: raw maps on a pipeline stream, replies decoded."""

    def __init__(self, stream: FramedStream) -> None:
        self.stream = stream
        self.rid = 0

    async def ask(self, m: dict[str, Any]) -> codec.Message:
        self.rid += 1
        await self.stream.send(m | {"rid": self.rid})
        return codec.from_map(await self.stream.receive(timeout=10))

    async def open(self, layers: LayerRange = WHOLE, **extra: Any) -> codec.Message:
        opening = codec.Open(0, MODEL, layers.start, layers.end, 16)
        return await self.ask(codec.to_map(opening) | extra)

    async def leave(self) -> None:
        """Close and wait for the server's end: by then it has freed the sessions."""
        await self.stream.close()
        with pytest.raises(PeerUnavailable):
            await self.stream.receive(timeout=10)


async def join(server: Node, *clients: Node) -> None:
    for client in clients:
        await client.connect(server.addrs[0])


async def raw_stream(client: Node, server: Node) -> Raw:
    return Raw(await client.open_stream(server.peer_id, codec.PROTOCOL_ID, timeout=10))


async def well_behaved(client: Node, server: Node, opener: Any = None) -> None:
    """The client library's own connection opens a session and gets the logits."""

    async def lanes(peer: str, protocol: str) -> FramedStream:
        return await client.lanes.open(peer, protocol, timeout=10)

    conn = await ShardConnection.open(opener or lanes, server.peer_id, MODEL, WHOLE, 16, timeout=10)
    logits = await conn.step(TOKENS, 0, top_k=1)
    assert logits.shape[0] == 1 and np.isfinite(logits.max())
    await conn.close()


def is_busy(reply: codec.Message, limit: str, scope: str) -> bool:
    return isinstance(reply, codec.Error) and (reply.code, reply.limit, reply.scope) == (
        codec.E_BUDGET,
        limit,
        scope,
    )


async def test_bad_peer_ids_in_open_and_step_are_refused_and_the_node_serves_on(
    config: Config, model_dir: Path, tmp_path: Path
) -> None:
    async with (
        serving(config, model_dir, tmp_path) as (node, server),
        Node(config("hostile")) as bad,
        Node(config("good")) as good,
    ):
        await join(node, bad, good)
        raw = await raw_stream(bad, node)
        opening = codec.to_map(codec.Open(1, MODEL, 0, 4, 16))
        for wrong in (NOT_BASE58, "12D3KooWpeer"):  # not base58; not a key's multihash
            with pytest.raises(RemoteProtocolError):
                codec.from_map(opening | {"next": wrong})
            refused = await raw.open(next=wrong)
            assert isinstance(refused, codec.Error) and refused.code == codec.E_BAD_REQUEST
            assert "next" in refused.message
        opened = await raw.open(FIRST, next=NOBODY)  # well formed: its warm-up fails alone
        assert isinstance(opened, codec.Opened)
        step = codec.to_map(codec.Step(0, opened.session, 0, TOKENS))
        fwd = {"peer": NOT_BASE58, "session": 1, "key": bytes(16), "k": 0}
        for extra in ({"fwd": [fwd]}, {"ring": {"chain": [fwd], "left": 2, "eos": -1}}):
            refused = await raw.ask(step | extra)
            assert isinstance(refused, codec.Error) and refused.code == codec.E_BAD_REQUEST
            assert "peer" in refused.message
        # a push to a peer nobody runs fails in its own task; the step is still answered
        pushed = await raw.ask(step | {"fwd": [fwd | {"peer": NOBODY}]})
        assert isinstance(pushed, codec.Output)
        assert server.pusher is not None and server.pusher.failed == 1
        await raw.leave()
        assert server.quotas.sessions.held() == server.budget.used == 0
        await well_behaved(good, node)
        assert server.steps_served == 2


async def test_one_peer_hoarding_sessions_gets_busy_and_others_still_get_sessions(
    config: Config, model_dir: Path, tmp_path: Path
) -> None:
    limits = PipelineLimits(sessions=Limit(per_peer=2, per_source=6, total=64))
    async with (
        serving(config, model_dir, tmp_path, limits=limits) as (node, server),
        Node(config("hoarder")) as bad,
        Node(config("good")) as good,
    ):
        await join(node, bad, good)
        streams = [await raw_stream(bad, node) for _ in range(6)]
        replies = [await s.open() for s in streams]
        assert [isinstance(r, codec.Opened) for r in replies] == [True] * 2 + [False] * 4
        assert all(is_busy(r, "pipeline.sessions", "peer") for r in replies[2:])
        assert server.quotas.sessions.held(peer=bad.peer_id) == 2
        with pytest.raises(Busy):  # what the client library raises for the refusal
            await ShardConnection.open(
                lambda p, proto: bad.open_stream(p, proto),
                node.peer_id,
                MODEL,
                WHOLE,
                16,
                timeout=10,
            )
        await well_behaved(good, node)  # same address, another peer: its own share
        for s in streams:
            await s.leave()
        assert server.quotas.sessions.held() == server.quotas.kv_bytes.held() == 0


async def test_peer_ids_minted_on_one_address_share_its_source_limit(
    config: Config, model_dir: Path, tmp_path: Path
) -> None:
    """Three hostile peer ids on 127.0.0.1 get the source's four sessions between them,
    not two each; a client on another address (127.0.0.2, over the direct lane) still
    gets a session."""
    limits = PipelineLimits(sessions=Limit(per_peer=2, per_source=4, total=64))
    async with (
        serving(config, model_dir, tmp_path, limits=limits) as (node, server),
        Node(config("m0")) as m0,
        Node(config("m1")) as m1,
        Node(config("m2")) as m2,
        Node(config("good")) as good,
    ):
        await join(node, m0, m1, m2, good)
        streams = [await raw_stream(m, node) for m in (m0, m1, m2) for _ in range(2)]
        replies = [await s.open() for s in streams]
        assert [isinstance(r, codec.Opened) for r in replies] == [True] * 4 + [False] * 2
        assert all(is_busy(r, "pipeline.sessions", "source") for r in replies[4:])
        assert server.quotas.sessions.held(source="127.0.0.1") == 4

        async def from_another_address(peer: str, protocol: str) -> FramedStream:
            tickets = await good.open_stream(peer, direct_codec.PROTOCOL_ID, timeout=10)
            lane = await open_direct(tickets, protocol, timeout=10, local_address="127.0.0.2")
            assert lane.source == "127.0.0.1"  # where we dialled; the server sees 127.0.0.2
            return lane

        await well_behaved(good, node, from_another_address)
        for s in streams:
            await s.leave()
        assert server.quotas.sessions.held() == 0


async def test_silent_lane_connections_cannot_crowd_out_a_real_handshake(
    config: Config, model_dir: Path, tmp_path: Path
) -> None:
    """64 silent TCP connections from one address (and 32 from 32 others) sit on the lane
    port: one address holds at most its 8 handshakes, the rest are closed at once, a real
    lane handshake still succeeds, and the silent ones are closed after the deadline."""
    lane_limits = LaneLimits(hello_timeout=3.0, handshakes_per_source=8, handshakes_total=128)
    async with (
        serving(config, model_dir, tmp_path, lane=lane_limits) as (node, _),
        Node(config("good")) as good,
    ):
        await join(node, good)
        lane = node.lanes.server
        assert lane is not None
        closed: list[tuple[str, float]] = []
        crowd_settled = trio.Event()
        sources = ["127.0.0.2"] * 64 + [f"127.0.0.{i}" for i in range(10, 42)]

        async def silent(source: str) -> None:
            began = trio.current_time()  # before the server could have accepted it
            tcp = await trio.open_tcp_stream("127.0.0.1", lane.port, local_address=source)
            assert await tcp.receive_some(100) == b""  # the server hung up
            closed.append((source, trio.current_time() - began))
            if len(closed) == 56:  # every connection past the source's 8 is refused
                crowd_settled.set()
            await tcp.aclose()

        async with trio.open_nursery() as nursery:
            for source in sources:
                nursery.start_soon(silent, source)
            with trio.fail_after(2.5):  # before the deadline closes the held ones
                await crowd_settled.wait()
                # the refusals can settle before the other 32 sources are accepted
                await trio.testing.wait_all_tasks_blocked(cushion=0.05)
            assert all(source == "127.0.0.2" for source, _ in closed)
            assert lane.handshakes.held(source="127.0.0.2") == 8
            assert lane.handshakes.held() == 8 + 32
            stream = await good.lanes.open(node.peer_id, codec.PROTOCOL_ID, timeout=10)
            assert isinstance(stream, SealedStream)  # the lane, not the libp2p fallback

            async def over_lane(peer: str, protocol: str) -> FramedStream:
                return stream

            await well_behaved(good, node, over_lane)
        held = sorted(seconds for _, seconds in closed)[56:]
        assert len(held) == 40 and min(held) >= 3.0 - 0.01  # closed by the deadline
        assert lane.handshakes.held() == 0 and lane.rejected == 96 and lane.accepted == 1
