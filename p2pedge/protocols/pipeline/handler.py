"""Trio glue for the pipeline server: streams in, machine decisions, onnxruntime steps out.

:class:`PipelineServer` owns the loaded shards and the KV budget shared by all streams.
Each stream gets its own :class:`ServerMachine`; a bad message is answered with a typed
error and the stream goes on, an oversized frame or a vanished peer ends only that
stream (its sessions are freed), never the server or other streams.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
import trio

from p2pedge.errors import (
    FrameTooLarge,
    LocalProtocolError,
    PeerUnavailable,
    RemoteProtocolError,
    ShardFailed,
)
from p2pedge.ids import LayerRange
from p2pedge.protocols._stream import FramedStream
from p2pedge.protocols.pipeline import codec
from p2pedge.protocols.pipeline.machine import (
    DEFAULT_IDLE_TIMEOUT,
    Action,
    Allocate,
    KvBudget,
    Release,
    Run,
    Send,
    ServerMachine,
    ShardSpec,
)
from p2pedge.runtime.shard_session import ShardModel, ShardSession

log = logging.getLogger(__name__)

DEFAULT_BUDGET_BYTES = 1 << 30
StreamHandler = Callable[[FramedStream, str], Awaitable[None]]


class NodeLike(Protocol):
    def set_stream_handler(self, protocol_id: str, handler: StreamHandler) -> None: ...


def spec_of(model: ShardModel, max_length: int) -> ShardSpec:
    """The machine's view of a shard; sessions never outgrow the model's context."""
    info = model.info
    max_length = min(max_length, model.context_length or max_length)
    return ShardSpec(
        first=info.first,
        last=info.last,
        hidden=info.hidden,
        vocab=info.vocab or 0,
        kv_bytes_per_token=info.kv_bytes_per_token,
        max_length=max_length,
    )


class PipelineServer:
    """Serves loaded shards on ``/p2pedge/pipeline/1.0.0``.

    ``shards`` maps ``(model name, block range)`` to a loaded :class:`ShardModel`.
    ``offload=False`` runs onnxruntime on the trio thread (deterministic tests with a
    mock clock); otherwise steps run in worker threads, ``max_parallel`` at a time.
    """

    def __init__(
        self,
        shards: Mapping[tuple[str, LayerRange], ShardModel],
        *,
        budget_bytes: int = DEFAULT_BUDGET_BYTES,
        max_length: int = 4096,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
        max_parallel: int = 1,
        offload: bool = True,
    ) -> None:
        self.shards = dict(shards)
        self.catalog = {key: spec_of(m, max_length) for key, m in self.shards.items()}
        self.budget = KvBudget(budget_bytes)
        self.idle_timeout = idle_timeout
        self.offload = offload
        self.limiter = trio.CapacityLimiter(max_parallel)
        self.steps_served = 0

    def layers_served(self) -> list[dict[str, Any]]:
        """Entries for the capability card's ``layers_served``."""
        return [{"model": m, "start": r.start, "end": r.end} for m, r in sorted(self.shards)]

    def register(self, node: NodeLike) -> None:
        node.set_stream_handler(codec.PROTOCOL_ID, self.handle)

    async def handle(self, stream: FramedStream, peer_id: str) -> None:
        """Serve one stream until the peer leaves; frees every session it opened."""
        machine = ServerMachine(self.catalog, self.budget, idle_timeout=self.idle_timeout)
        conn = _Connection(self, machine, stream, peer_id)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(conn.expire_idle)
                await conn.serve()
                nursery.cancel_scope.cancel()
        finally:
            conn.apply_releases(machine.stream_ended())
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                try:
                    await stream.close()
                except PeerUnavailable:
                    pass  # already gone; its sessions were freed above

    async def run_step(
        self, session: ShardSession, action: Run
    ) -> tuple[Any, npt.NDArray[np.int64] | None]:
        """Output (or top-k logits) and top-k ids, computed off the trio thread."""

        def work() -> tuple[Any, npt.NDArray[np.int64] | None]:
            y = session.step(action.x, action.start, last_only=action.last_only)
            if action.top_k:
                return codec.top_k_of(y, action.top_k)
            return y, None

        if not self.offload:
            return work()
        return await trio.to_thread.run_sync(work, limiter=self.limiter)


class _Connection:
    def __init__(
        self, server: PipelineServer, machine: ServerMachine, stream: FramedStream, peer: str
    ) -> None:
        self.server = server
        self.machine = machine
        self.stream = stream
        self.peer = peer
        self.sessions: dict[int, ShardSession] = {}
        self.changed = trio.Event()

    async def serve(self) -> None:
        while True:
            try:
                raw = await self.stream.receive()
            except PeerUnavailable:
                return
            except FrameTooLarge as exc:
                log.info("pipeline peer %s sent an oversized frame: %s", self.peer, exc)
                await self._send(codec.Error(0, codec.E_BAD_REQUEST, str(exc)))
                return
            except RemoteProtocolError as exc:
                await self._send(codec.Error(0, codec.E_BAD_REQUEST, str(exc)))
                continue
            try:
                msg = codec.from_map(raw)
            except RemoteProtocolError as exc:
                rid = raw.get("rid")
                rid = rid if type(rid) is int and 0 <= rid <= codec.MAX_ID else 0
                await self._send(codec.Error(rid, codec.E_BAD_REQUEST, str(exc)))
                continue
            await self.perform(self.machine.receive(msg, trio.current_time()))
            self.changed.set()
            self.changed = trio.Event()

    async def _send(self, reply: codec.Message) -> None:
        try:
            await self.stream.send(codec.to_map(reply))
        except PeerUnavailable:
            log.debug("pipeline peer %s left before a reply", self.peer)

    async def perform(self, actions: list[Action]) -> None:
        pending = list(actions)
        while pending:
            action = pending.pop(0)
            now = trio.current_time
            if isinstance(action, Send):
                await self._send(action.reply)
            elif isinstance(action, Release):
                self.sessions.pop(action.session, None)
            elif isinstance(action, Allocate):
                model = self.server.shards[(action.model, action.layers)]
                self.sessions[action.session] = model.new_session(action.max_length)
                pending[:0] = self.machine.ready(action.session, now())
            elif isinstance(action, Run):
                pending[:0] = await self._run(action)

    async def _run(self, action: Run) -> list[Action]:
        session = self.sessions[action.session]
        try:
            y, ids = await self.server.run_step(session, action)
        except (ShardFailed, LocalProtocolError, MemoryError) as exc:
            log.warning("pipeline step failed for %s: %s", self.peer, exc)
            return self.machine.failed(action.session, f"step failed: {exc}", trio.current_time())
        self.server.steps_served += 1
        return self.machine.step_done(action.session, y, trio.current_time(), ids)

    def apply_releases(self, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, Release):
                self.sessions.pop(action.session, None)

    async def expire_idle(self) -> None:
        while True:
            deadline = self.machine.next_deadline()
            changed = self.changed
            with trio.move_on_at(deadline if deadline is not None else float("inf")):
                await changed.wait()
                continue
            self.apply_releases(self.machine.tick(trio.current_time()))
