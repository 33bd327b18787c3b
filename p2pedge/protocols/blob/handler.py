"""Thin trio glue: serve blobs from a :class:`Store`, fetch them from peers, announce them.

``BlobService.handle`` is registered with ``node.set_stream_handler(PROTOCOL_ID, ...)``;
``PeerChunkSource`` is a pull source (see :mod:`p2pedge.models.sources`) over
``node.open_stream``; :func:`announce_store` advertises every held blob and model in the
DHT (``blob/<first 32 hex>``, ``model/<name>``) and :func:`swarm_sources` turns provider
records into sources. Nothing here trusts a peer: the puller hashes every chunk.
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Protocol

import trio

from p2pedge.errors import (
    Busy,
    IntegrityError,
    ModelNotCached,
    PeerUnavailable,
    RemoteProtocolError,
)
from p2pedge.ids import ModelId
from p2pedge.models.sources import SourceMissing
from p2pedge.models.store import Store
from p2pedge.protocols._stream import FramedStream
from p2pedge.protocols.blob.codec import (
    MAX_REQUEST_FRAME,
    MAX_RESPONSE_FRAME,
    PROTOCOL_ID,
    ChunkRequest,
    DataResponse,
    ErrorResponse,
    ManifestRequest,
    Request,
    Response,
    decode_request,
    encode_response,
)
from p2pedge.protocols.blob.machine import BlobClientMachine, BlobServerGate, ClientState

OpenStream = Callable[[], Awaitable[FramedStream]]


def provider_key(digest: str) -> str:
    """DHT key under which holders of a blob announce themselves."""
    return "blob/" + digest[:32]


def model_key(name: str) -> str:
    """DHT key for holders of any version of a model (long names are hashed to fit)."""
    key = "model/" + name
    return key if len(key) < 48 else "model/" + hashlib.sha256(name.encode()).hexdigest()[:32]


class BlobService:
    """Answers blob requests from peers, one request at a time per stream."""

    def __init__(
        self,
        store: Store,
        gate: BlobServerGate | None = None,
        *,
        idle_timeout: float = 60.0,
        clock: Callable[[], float] = trio.current_time,
    ) -> None:
        self.store = store
        self.gate = gate or BlobServerGate()
        self.idle_timeout = idle_timeout
        self.clock = clock
        self.served_chunks = 0

    async def handle(self, stream: FramedStream, peer_id: str) -> None:
        reader = FramedStream(stream.stream, max_frame=MAX_REQUEST_FRAME)
        writer = FramedStream(stream.stream, max_frame=MAX_RESPONSE_FRAME)
        while True:
            try:
                payload = await reader.receive_bytes(timeout=self.idle_timeout)
            except PeerUnavailable:
                return
            try:
                request = decode_request(payload)
            except RemoteProtocolError as exc:
                await writer.send_bytes(encode_response(ErrorResponse("bad_request", str(exc))))
                return
            if not self.gate.admit(peer_id, request, self.clock()):
                await writer.send_bytes(encode_response(ErrorResponse("busy", "slow down")))
                continue
            try:
                response = await self._answer(request)
            finally:
                self.gate.release(peer_id)
            await writer.send_bytes(encode_response(response))

    async def _answer(self, request: Request) -> Response:
        if isinstance(request, ManifestRequest):
            try:
                return DataResponse(self.store.manifest_bytes(request.model))
            except ModelNotCached:
                return ErrorResponse("not_found", f"no manifest for {request.model}")
        if not self.store.has_blob(request.digest):
            return ErrorResponse("not_found", "no such blob")
        try:
            data = await trio.to_thread.run_sync(
                self.store.read_chunk, request.digest, request.index, request.chunk_size
            )
        except (IntegrityError, ModelNotCached):
            return ErrorResponse("not_found", "blob failed verification here")
        if not data and request.index > 0:
            return ErrorResponse("not_found", "chunk index beyond the blob")
        self.served_chunks += 1
        return DataResponse(data)


class _Conn:
    def __init__(self, stream: FramedStream, timeout: float) -> None:
        self.reader = FramedStream(stream.stream, max_frame=MAX_RESPONSE_FRAME)
        self.writer = FramedStream(stream.stream, max_frame=MAX_REQUEST_FRAME)
        self.machine = BlobClientMachine(timeout)


class PeerChunkSource:
    """A pull source backed by one peer; keeps up to ``max_streams`` open streams."""

    def __init__(
        self, open_stream: OpenStream, name: str, *, timeout: float = 30.0, max_streams: int = 4
    ) -> None:
        self.open_stream = open_stream
        self.name = name
        self.timeout = timeout
        self._idle: list[_Conn] = []
        self._slots = trio.Semaphore(max_streams)

    @classmethod
    def for_node(cls, node: Any, peer_id: str, **kwargs: Any) -> PeerChunkSource:
        """A source for ``peer_id`` reached through ``node.open_stream``."""

        async def open_stream() -> FramedStream:
            stream: FramedStream = await node.open_stream(peer_id, PROTOCOL_ID)
            return stream

        return cls(open_stream, f"peer {peer_id}", **kwargs)

    async def _request(self, request: Request) -> bytes:
        async with self._slots:
            conn = self._idle.pop() if self._idle else _Conn(await self.open_stream(), self.timeout)
            try:
                payload = conn.machine.send(request, trio.current_time())
                await conn.writer.send_bytes(payload)
                answer = await conn.reader.receive_bytes(timeout=self.timeout)
                response = conn.machine.receive(answer, trio.current_time())
            except BaseException:
                conn.machine.fail()
                with trio.CancelScope(shield=True), trio.move_on_after(1):
                    try:
                        await conn.reader.reset()
                    except PeerUnavailable:
                        pass
                raise
            if conn.machine.state is ClientState.IDLE:
                self._idle.append(conn)
        if isinstance(response, DataResponse):
            return response.data
        if response.code == "not_found":
            raise SourceMissing(f"{self.name}: {response.message}")
        if response.code == "busy":
            raise Busy(f"{self.name} is busy")
        raise RemoteProtocolError(f"{self.name} refused: {response.code} {response.message}")

    async def fetch_chunk(self, digest: str, index: int, chunk_size: int) -> bytes:
        return await self._request(ChunkRequest(digest, index, chunk_size))

    async def fetch_manifest(self, model: ModelId) -> bytes:
        return await self._request(ManifestRequest(model))

    async def aclose(self) -> None:
        idle, self._idle = self._idle, []
        for conn in idle:
            try:
                await conn.writer.close()
            except PeerUnavailable:
                continue


class Provider(Protocol):
    async def provide(self, key: str) -> bool: ...


async def announce_store(
    node: Provider, store: Store, models: Iterable[ModelId] | None = None
) -> int:
    """Provide every held blob of ``models`` (default: all stored) and their names; returns
    the keys. A node holding only some files of a model (a shard server) announces its name
    too: it serves the manifest and those files, and a puller asks others for the rest."""
    keys: set[str] = set()
    for model in store.list_models() if models is None else models:
        manifest = store.get_manifest(model)
        keys.add(model_key(manifest.model.name))
        keys.update(provider_key(f.sha256) for f in manifest.files if store.has_blob(f.sha256))
    for key in sorted(keys):
        await node.provide(key)
    return len(keys)


async def swarm_sources(
    node: Any, model: ModelId, *, blobs: Iterable[str] = (), limit: int = 8
) -> list[PeerChunkSource]:
    """Sources for peers that announced ``model`` or hold any of ``blobs`` (sha256 digests:
    peers holding only some files of a model, such as shard servers, announce those).

    Provider lookups can miss some holders, so the blob keys are asked too and the answers
    merged; this node is left out.
    """
    keys = [model_key(model.name), *sorted({provider_key(d) for d in blobs})]
    peers: dict[str, None] = {}
    for key in keys:
        for peer in await node.find_providers(key, limit=limit):
            if peer != node.peer_id:
                peers.setdefault(peer, None)
        if len(peers) >= limit:
            break
    return [PeerChunkSource.for_node(node, p) for p in list(peers)[:limit]]
