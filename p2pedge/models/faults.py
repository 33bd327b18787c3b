"""Fault injectors for tests and benchmarks; each wraps a real part and breaks it on purpose."""

from __future__ import annotations

import errno
from typing import BinaryIO

import trio

from p2pedge.ids import ModelId
from p2pedge.models.sources import ChunkSource, SourceMissing


class DiskFullWriter:
    """A store writer that raises ``OSError(ENOSPC)`` once ``capacity`` bytes were written."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.written = 0

    def __call__(self, handle: BinaryIO, data: bytes) -> None:
        if self.written + len(data) > self.capacity:
            room = max(0, self.capacity - self.written)
            handle.write(data[:room])
            self.written += room
            raise OSError(errno.ENOSPC, "No space left on device (injected)")
        handle.write(data)
        self.written += len(data)


class CountingChunkSource:
    """Counts fetches of a real source (not a fault; used to check resume)."""

    def __init__(self, inner: ChunkSource) -> None:
        self.inner = inner
        self.name = inner.name
        self.fetches: list[tuple[str, int]] = []

    async def fetch_chunk(self, digest: str, index: int, chunk_size: int) -> bytes:
        self.fetches.append((digest, index))
        return await self.inner.fetch_chunk(digest, index, chunk_size)

    async def fetch_manifest(self, model: ModelId) -> bytes:
        fetch = getattr(self.inner, "fetch_manifest", None)
        if fetch is None:
            raise SourceMissing(f"{self.name} serves no manifests")
        data: bytes = await fetch(model)
        return data


class CancellingChunkSource(CountingChunkSource):
    """Cancels ``scope`` (the pull's) once ``after`` chunks were delivered: a killed pull."""

    def __init__(self, inner: ChunkSource, after: int, scope: trio.CancelScope) -> None:
        super().__init__(inner)
        self.after = after
        self.scope = scope
        self.delivered = 0

    async def fetch_chunk(self, digest: str, index: int, chunk_size: int) -> bytes:
        data = await super().fetch_chunk(digest, index, chunk_size)
        self.delivered += 1
        if self.delivered >= self.after:
            self.scope.cancel()
        return data


class TamperingChunkSource(CountingChunkSource):
    """Flips a byte in every chunk it serves (a malicious or broken peer)."""

    async def fetch_chunk(self, digest: str, index: int, chunk_size: int) -> bytes:
        data = bytearray(await super().fetch_chunk(digest, index, chunk_size))
        if data:
            data[len(data) // 2] ^= 0xFF
        else:
            data.append(0)
        return bytes(data)


class FlakyChunkSource(CountingChunkSource):
    """Raises ``error`` on every ``every``-th fetch (a connection that drops now and then)."""

    def __init__(self, inner: ChunkSource, every: int, error: Exception) -> None:
        super().__init__(inner)
        self.every = every
        self.error = error

    async def fetch_chunk(self, digest: str, index: int, chunk_size: int) -> bytes:
        if (len(self.fetches) + 1) % self.every == 0:
            self.fetches.append((digest, index))
            raise self.error
        return await super().fetch_chunk(digest, index, chunk_size)
