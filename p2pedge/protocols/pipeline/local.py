"""In-process wiring of real pipeline servers, plus fault injection, for tests and benches.

:class:`LocalSwarm` connects a client to real :class:`PipelineServer` handlers over
in-process byte streams (the same framing and codec as libp2p streams, no sockets).
:class:`FaultyShardServer` wraps a real server and crashes or freezes it after a number
of steps: a named fake, used only to inject faults.
"""

from __future__ import annotations

from typing import Any, Literal, Protocol

import trio

from p2pedge.errors import PeerUnavailable
from p2pedge.ids import LayerRange
from p2pedge.planning.routes import ServerOption
from p2pedge.protocols._stream import FramedStream, memory_stream_pair
from p2pedge.protocols.pipeline.handler import PipelineServer
from p2pedge.wire.framing import DEFAULT_MAX_FRAME


class StreamServer(Protocol):
    async def handle(self, stream: FramedStream, peer_id: str) -> None: ...

    def layers_served(self) -> list[dict[str, Any]]: ...


class _CountingStream(FramedStream):
    """A server-side stream that tells its :class:`FaultyShardServer` about each step."""

    def __init__(self, inner: FramedStream, owner: FaultyShardServer) -> None:
        super().__init__(inner.stream, max_frame=inner.max_frame)
        self.owner = owner

    async def receive(self, timeout: float | None = None) -> dict[str, Any]:
        message = await super().receive(timeout)
        if message.get("t") == "step":
            self.owner.steps_seen += 1
            if self.owner.steps_seen > self.owner.fail_after_steps:
                await self.owner.trip(self)
        return message


class FaultyShardServer:
    """A real server that crashes (``"drop"``) or freezes (``"freeze"``) on step k + 1.

    A crash resets the stream (the client sees end of stream) and refuses new streams;
    a freeze stops reading and answering forever, which only a client deadline detects.
    """

    def __init__(
        self,
        inner: PipelineServer,
        fail_after_steps: int,
        mode: Literal["drop", "freeze"] = "drop",
    ) -> None:
        self.inner = inner
        self.fail_after_steps = fail_after_steps
        self.mode = mode
        self.steps_seen = 0
        self.tripped = False

    def layers_served(self) -> list[dict[str, Any]]:
        return self.inner.layers_served()

    async def trip(self, stream: FramedStream) -> None:
        self.tripped = True
        if self.mode == "freeze":
            await trio.sleep_forever()
        await stream.reset()
        raise PeerUnavailable("FaultyShardServer crashed on purpose")

    async def handle(self, stream: FramedStream, peer_id: str) -> None:
        if self.tripped:
            if self.mode == "freeze":
                await trio.sleep_forever()
            await stream.reset()
            return
        await self.inner.handle(_CountingStream(stream, self), peer_id)


class LocalSwarm:
    """Servers addressed by made-up peer ids, reached over in-process streams."""

    def __init__(self, nursery: trio.Nursery, *, max_frame: int | None = None) -> None:
        self.nursery = nursery
        self.servers: dict[str, StreamServer] = {}
        self.stats: dict[str, dict[str, float]] = {}
        self.max_frame = max_frame

    def add(self, peer_id: str, server: StreamServer, *, compute_gflops: float = 10.0) -> None:
        self.servers[peer_id] = server
        self.stats[peer_id] = {"compute_gflops": compute_gflops, "load": 0.0}

    def remove(self, peer_id: str) -> None:
        self.servers.pop(peer_id, None)

    async def open_stream(self, peer_id: str, protocol_id: str) -> FramedStream:
        server = self.servers.get(peer_id)
        if server is None:
            raise PeerUnavailable(f"no server {peer_id} in this LocalSwarm")
        ours, theirs = memory_stream_pair()
        max_frame = DEFAULT_MAX_FRAME if self.max_frame is None else self.max_frame
        self.nursery.start_soon(
            server.handle, FramedStream(theirs, max_frame=max_frame), "local-client"
        )
        return FramedStream(ours, max_frame=max_frame)

    async def options(self) -> list[ServerOption]:
        """What the capability cards of every live server would offer."""
        found: list[ServerOption] = []
        for peer, server in self.servers.items():
            stats = self.stats[peer]
            for entry in server.layers_served():
                found.append(
                    ServerOption(
                        peer,
                        LayerRange(entry["start"], entry["end"]),
                        stats["compute_gflops"],
                        stats["load"],
                    )
                )
        return found
