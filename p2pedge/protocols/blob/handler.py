"""Thin trio glue: serve blobs from a :class:`Store`, fetch them from peers, announce them.

``BlobService.handle`` is registered with ``node.set_stream_handler(PROTOCOL_ID, ...)``
and on the node's direct lane (TLS 1.3 over TCP, encryption in OpenSSL: the bulk path,
since py-libp2p's Noise and yamux run in Python and cap a stream well below the disk);
``PeerChunkSource`` is a pull source (see :mod:`p2pedge.models.sources`) over the lane when
the peer offers one, else ``node.open_stream``; :func:`announce_store` advertises every
held blob and model in the DHT (``blob/<first 32 hex>``, ``model/<name>``) and
:func:`swarm_sources` turns provider records into sources. Both transports run the same
handler under the same gate and quotas. Nothing here trusts a peer: the puller hashes
every chunk.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Protocol

import trio

from p2pedge.errors import (
    Busy,
    IntegrityError,
    ModelNotCached,
    PeerTimeout,
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
    encode_data_parts,
    encode_response,
)
from p2pedge.protocols.blob.machine import (
    BYTES_IN_FLIGHT,
    BlobClientMachine,
    BlobLimits,
    BlobServerGate,
    ClientState,
)
from p2pedge.quota import Quota
from p2pedge.records.keys import blob_key, model_key

OpenStream = Callable[[], Awaitable[FramedStream]]
OPEN_TIMEOUT = 10.0


class LaneOpener(Protocol):
    """The node's lanes (``p2pedge.node.lanes.Lanes``): a lane stream to a peer that offers
    one for the protocol, else a libp2p stream."""

    async def open(self, peer_id: str, protocol_id: str, *, timeout: float) -> FramedStream: ...


provider_key = blob_key  # DHT keys are built in p2pedge.records.keys


class BlobService:
    """Answers blob requests from peers, one request at a time per stream.

    A request that breaks the protocol (an oversize frame, a bad field, a chunk index
    beyond the blob) gets ``bad_request`` and ends its stream with a
    :class:`RemoteProtocolError`. A reply holds its bytes in the ``blob.bytes_in_flight``
    quota from before it is read from disk until it is written, so readers that stop
    reading hold at most their share; over it, they get ``busy`` naming the limit.
    """

    def __init__(
        self,
        store: Store,
        gate: BlobServerGate | None = None,
        *,
        limits: BlobLimits | None = None,
        clock: Callable[[], float] = trio.current_time,
    ) -> None:
        self.store = store
        self.limits = limits or BlobLimits()
        self.gate = gate or BlobServerGate(self.limits.gate)
        self.bytes_in_flight = Quota(BYTES_IN_FLIGHT, self.limits.bytes_in_flight)
        self.clock = clock
        self.served_chunks = 0
        self.served_bytes = 0  # data bytes written to peers (chunks and manifests)

    async def handle(self, stream: FramedStream, peer_id: str) -> None:
        reader = stream.reframed(MAX_REQUEST_FRAME)
        writer = stream.reframed(MAX_RESPONSE_FRAME)
        while True:
            try:
                payload = await reader.receive_bytes(timeout=self.limits.idle_timeout)
                request = decode_request(payload)
            except PeerUnavailable:
                return
            except RemoteProtocolError as exc:
                await self._refuse(writer, exc)
                raise
            try:
                self.gate.enter(peer_id, request, self.clock())
            except Busy as exc:
                await self._send(writer, _busy(exc))
                continue
            try:
                cost = self._cost(request)
                grant = self.bytes_in_flight.acquire(peer_id, stream.source, cost)
            except RemoteProtocolError as exc:
                self.gate.release(peer_id)
                await self._refuse(writer, exc)
                raise
            except Busy as exc:
                self.gate.release(peer_id)
                await self._send(writer, _busy(exc))
                continue
            except ModelNotCached as exc:
                self.gate.release(peer_id)
                await self._send(writer, ErrorResponse("not_found", str(exc)))
                continue
            try:
                try:
                    response = await self._answer(request)
                finally:
                    self.gate.release(peer_id)
                await self._send(writer, response)  # the bytes stay charged until written
                if isinstance(response, DataResponse):
                    self.served_bytes += len(response.data)
            finally:
                self.bytes_in_flight.release(grant)

    def _cost(self, request: Request) -> int:
        """Bytes the answer will hold, known before it is read: a chunk's length from the
        blob's size (an index beyond it is the peer's fault), a manifest's file size."""
        if isinstance(request, ManifestRequest):
            return self.store.manifest_size(request.model) + _OVERHEAD
        try:
            size = self.store.blob_path(request.digest).stat().st_size
        except FileNotFoundError as exc:
            raise ModelNotCached(f"sha256-{request.digest[:16]}") from exc
        start = request.index * request.chunk_size
        if start >= size and not (start == 0 and size == 0):
            chunks = -(-size // request.chunk_size)
            raise RemoteProtocolError(
                f"chunk index {request.index} beyond a blob of {chunks} chunks"
            )
        return min(request.chunk_size, size - start) + _OVERHEAD

    async def _send(self, writer: FramedStream, response: Response) -> None:
        """Write one answer within ``write_timeout``; a reader that stopped reading has
        its stream reset (``PeerTimeout``), which frees what the reply held."""
        send_parts = getattr(writer, "send_parts", None)  # a lane stream: no joined copy
        with trio.move_on_after(self.limits.write_timeout) as scope:
            if isinstance(response, DataResponse) and send_parts is not None:
                await send_parts(*encode_data_parts(response.data))
            else:
                await writer.send_bytes(encode_response(response))
        if scope.cancelled_caught:
            with trio.move_on_after(1):
                await writer.reset()
            raise PeerTimeout(f"reply not read within {self.limits.write_timeout:g} s")

    async def _refuse(self, writer: FramedStream, exc: RemoteProtocolError) -> None:
        """Best effort ``bad_request`` before the stream ends (the peer may be gone)."""
        with contextlib.suppress(PeerUnavailable):
            await self._send(writer, ErrorResponse("bad_request", str(exc)))

    async def _answer(self, request: Request) -> Response:
        if isinstance(request, ManifestRequest):
            try:
                data = await trio.to_thread.run_sync(self.store.manifest_bytes, request.model)
                return DataResponse(data)
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


_OVERHEAD = 64  # msgpack map and frame prefix around a reply's data


def _busy(exc: Busy) -> ErrorResponse:
    return ErrorResponse("busy", str(exc), exc.limit, exc.scope)


class _Conn:
    def __init__(self, stream: FramedStream, timeout: float, now: float) -> None:
        self.reader = stream.reframed(MAX_RESPONSE_FRAME)
        self.writer = stream.reframed(MAX_REQUEST_FRAME)
        self.machine = BlobClientMachine(timeout)
        self.used_at = now


class PeerChunkSource:
    """A pull source backed by one peer; keeps up to ``max_streams`` open streams.

    An idle stream is reused only if it was last used less than ``reuse_idle`` seconds
    ago (well inside the server's idle timeout); a reused stream that turns out closed
    (the server ended it meanwhile) is replaced by a fresh one once, so an honest peer's
    idle streams never fail a request.
    """

    def __init__(
        self,
        open_stream: OpenStream,
        name: str,
        *,
        timeout: float = 30.0,
        max_streams: int = 4,
        reuse_idle: float = 15.0,
    ) -> None:
        self.open_stream = open_stream
        self.name = name
        self.timeout = timeout
        self.reuse_idle = reuse_idle
        self.opened = 0
        self._idle: list[_Conn] = []
        self._slots = trio.Semaphore(max_streams)

    @classmethod
    def for_node(
        cls, node: Any, peer_id: str, *, lanes: LaneOpener | None = None, **kwargs: Any
    ) -> PeerChunkSource:
        """A source for ``peer_id``: each stream over ``lanes`` (the direct lane, falling
        back to libp2p by itself) when given, else through ``node.open_stream``."""

        async def open_stream() -> FramedStream:
            if lanes is not None:
                return await lanes.open(peer_id, PROTOCOL_ID, timeout=OPEN_TIMEOUT)
            stream: FramedStream = await node.open_stream(peer_id, PROTOCOL_ID)
            return stream

        return cls(open_stream, f"peer {peer_id}", **kwargs)

    async def _conn(self, now: float) -> tuple[_Conn, bool]:
        """An idle stream fresh enough to reuse, else a new one; and whether it is reused."""
        while self._idle:
            conn = self._idle.pop()
            if now - conn.used_at < self.reuse_idle:
                return conn, True
            await _discard(conn)
        self.opened += 1
        return _Conn(await self.open_stream(), self.timeout, now), False

    async def _exchange(self, conn: _Conn, request: Request) -> Response:
        try:
            payload = conn.machine.send(request, trio.current_time())
            await conn.writer.send_bytes(payload)
            answer = await conn.reader.receive_bytes(timeout=self.timeout)
            return conn.machine.receive(answer, trio.current_time())
        except BaseException:
            conn.machine.fail()
            with trio.CancelScope(shield=True):
                await _discard(conn)
            raise

    async def _request(self, request: Request) -> bytes:
        async with self._slots:
            conn, reused = await self._conn(trio.current_time())
            try:
                response = await self._exchange(conn, request)
            except PeerTimeout:
                raise
            except PeerUnavailable:
                if not reused:
                    raise
                conn = _Conn(await self.open_stream(), self.timeout, trio.current_time())
                self.opened += 1
                response = await self._exchange(conn, request)
            if conn.machine.state is ClientState.IDLE:
                conn.used_at = trio.current_time()
                self._idle.append(conn)
        if isinstance(response, DataResponse):
            return response.data
        if response.code == "not_found":
            raise SourceMissing(f"{self.name}: {response.message}")
        if response.code == "busy":
            raise Busy(
                f"{self.name} is busy: {response.message}",
                limit=response.limit,
                scope=response.scope,
            )
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


async def _discard(conn: _Conn) -> None:
    """Reset a stream we will not use again (it may be dead already)."""
    with trio.move_on_after(1), contextlib.suppress(PeerUnavailable):
        await conn.reader.reset()


class Provider(Protocol):
    async def provide(self, key: str) -> bool: ...


async def announce_store(
    node: Provider, store: Store, models: Iterable[ModelId] | None = None
) -> int:
    """Provide every held blob of ``models`` (default: all stored) and their names; returns
    the keys. A node holding only some files of a model (a shard server) announces its name
    too: it serves the manifest and those files, and a puller asks others for the rest."""

    def held_keys() -> set[str]:  # parses every stored manifest: off the loop
        keys: set[str] = set()
        for model in store.list_models() if models is None else models:
            manifest = store.get_manifest(model)
            keys.add(model_key(manifest.model.name))
            keys.update(provider_key(f.sha256) for f in manifest.files if store.has_blob(f.sha256))
        return keys

    keys = await trio.to_thread.run_sync(held_keys)
    for key in sorted(keys):
        await node.provide(key)
    return len(keys)


async def swarm_sources(
    node: Any,
    model: ModelId,
    *,
    blobs: Iterable[str] = (),
    limit: int = 8,
    lanes: LaneOpener | None = None,
) -> list[PeerChunkSource]:
    """Sources for peers that announced ``model`` or hold any of ``blobs`` (sha256 digests:
    peers holding only some files of a model, such as shard servers, announce those),
    reached over ``lanes`` when given (see :meth:`PeerChunkSource.for_node`).

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
    return [PeerChunkSource.for_node(node, p, lanes=lanes) for p in list(peers)[:limit]]
