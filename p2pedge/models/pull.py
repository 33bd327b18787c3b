"""Pull a model into the local store from many sources at once, verifying every chunk.

The manifest comes from the first source that returns one signed by a trusted publisher.
Missing chunks go into one shared queue; each source runs ``per_source`` workers that take
the next chunk that source has not said it lacks, so fast sources take more work (work
stealing). A chunk is hashed against the manifest before it is committed to ``partial/``;
a wrong hash drops that source for the rest of the pull and puts the chunk back for the
others. Committed chunks survive a killed pull, so a re-run fetches only what is missing.
"""

from __future__ import annotations

import hashlib
import sys
import time
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import trio

from p2pedge.errors import (
    Busy,
    IntegrityError,
    ModelNotCached,
    P2PEdgeError,
    PeerUnavailable,
    RemoteProtocolError,
)
from p2pedge.ids import ModelId
from p2pedge.models.keys import TrustStore
from p2pedge.models.manifest import FileEntry, Manifest, chunk_count, chunk_length, load_verified
from p2pedge.models.sources import ChunkSource, ManifestSource, SourceMissing
from p2pedge.models.store import Store

MAX_BUSY = 100
TRANSIENT: tuple[type[BaseException], ...] = (
    PeerUnavailable,
    RemoteProtocolError,
    trio.TooSlowError,
)


class PullFailed(PeerUnavailable):
    """No remaining source could supply some chunks (all lacked them or were dropped)."""


class ChunkIntegrityError(IntegrityError):
    """The pull failed and at least one source was dropped for serving bad bytes."""


@dataclass
class PullResult:
    manifest: Manifest
    fetched_chunks: int = 0
    fetched_bytes: int = 0
    reused_chunks: int = 0
    by_source: dict[str, int] = field(default_factory=dict)
    dropped: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0


@dataclass(frozen=True)
class _Chunk:
    entry: FileEntry
    index: int


class StoreChunkSource:
    """Serves chunks straight from another local :class:`Store` (a mirror on shared disk)."""

    def __init__(self, store: Store, name: str = "store") -> None:
        self.store = store
        self.name = name

    async def fetch_chunk(self, digest: str, index: int, chunk_size: int) -> bytes:
        if not self.store.has_blob(digest):
            raise SourceMissing(f"{self.name} lacks sha256-{digest[:16]}")
        return await trio.to_thread.run_sync(self.store.read_chunk, digest, index, chunk_size)

    async def fetch_manifest(self, model: ModelId) -> bytes:
        try:
            return self.store.manifest_bytes(model)
        except ModelNotCached as exc:
            raise SourceMissing(str(exc)) from exc


async def fetch_manifest(
    model: ModelId, sources: Sequence[ChunkSource], trust: TrustStore
) -> Manifest:
    """The first trusted manifest any source offers; integrity failures outrank absence."""
    errors: list[str] = []
    integrity: IntegrityError | None = None
    for source in sources:
        if not isinstance(source, ManifestSource):
            continue
        try:
            data = await source.fetch_manifest(model)
            return load_verified(data, trust, expect=model)
        except IntegrityError as exc:
            integrity = integrity or exc
            errors.append(f"{source.name}: {exc}")
        except SourceMissing as exc:
            errors.append(f"{source.name}: {exc}")
        except TRANSIENT as exc:
            errors.append(f"{source.name}: {exc}")
    if integrity is not None:
        raise integrity
    raise ModelNotCached(f"{model} ({'; '.join(errors) or 'no manifest source'})")


class _Scheduler:
    """The shared chunk queue; wakes idle workers whenever its state changes."""

    def __init__(self, chunks: Iterable[_Chunk]) -> None:
        self.pending: deque[_Chunk] = deque(chunks)
        self.in_flight = 0
        self.lacks: dict[str, set[str]] = {}
        self.dropped: dict[str, str] = {}
        self._changed = trio.Event()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def take(self, source: str) -> _Chunk | None:
        lacking = self.lacks.get(source, set())
        for position, chunk in enumerate(self.pending):
            if chunk.entry.sha256 not in lacking:
                del self.pending[position]
                self.in_flight += 1
                return chunk
        return None

    def give_back(self, chunk: _Chunk) -> None:
        self.in_flight -= 1
        self.pending.appendleft(chunk)
        self._notify()

    def finish(self) -> None:
        self.in_flight -= 1
        self._notify()

    def drop(self, source: str, reason: str) -> None:
        self.dropped.setdefault(source, reason)
        self._notify()

    def lack(self, source: str, digest: str) -> None:
        self.lacks.setdefault(source, set()).add(digest)

    async def wait(self) -> None:
        await self._changed.wait()


class _Pull:
    def __init__(
        self,
        store: Store,
        manifest: Manifest,
        chunks: list[_Chunk],
        remaining: dict[str, int],
        result: PullResult,
        *,
        chunk_timeout: float,
        max_failures: int,
        progress: object,
    ) -> None:
        self.store = store
        self.manifest = manifest
        self.sched = _Scheduler(chunks)
        self.remaining = remaining
        self.result = result
        self.chunk_timeout = chunk_timeout
        self.max_failures = max_failures
        self.progress = progress
        self.fatal: Exception | None = None
        self.cancel = trio.CancelScope()

    async def worker(self, source: ChunkSource, failures: list[int]) -> None:
        """Fetch chunks for one source; ``failures`` = [errors in a row, busy in a row]."""
        sched = self.sched
        size = self.manifest.chunk_size
        while source.name not in sched.dropped:
            chunk = sched.take(source.name)
            if chunk is None:
                if sched.in_flight == 0:
                    return
                await sched.wait()
                continue
            entry = chunk.entry
            try:
                with trio.fail_after(self.chunk_timeout):
                    data = await source.fetch_chunk(entry.sha256, chunk.index, size)
            except SourceMissing:
                sched.lack(source.name, entry.sha256)
                sched.give_back(chunk)
                continue
            except Busy:
                sched.give_back(chunk)
                failures[1] += 1
                if failures[1] >= MAX_BUSY:
                    sched.drop(source.name, "busy for too long")
                await trio.sleep(min(1.0, 0.01 * failures[1]))
                continue
            except TRANSIENT as exc:
                failures[0] += 1
                if failures[0] >= self.max_failures:
                    sched.drop(source.name, f"{type(exc).__name__}: {exc}")
                sched.give_back(chunk)
                continue
            expected = chunk_length(entry.size, size, chunk.index)
            if (
                len(data) != expected
                or hashlib.sha256(data).hexdigest() != entry.chunks[chunk.index]
            ):
                sched.drop(
                    source.name, f"bad chunk {chunk.index} of {entry.path} (sha256 mismatch)"
                )
                sched.give_back(chunk)
                continue
            failures[0] = failures[1] = 0
            try:
                await trio.to_thread.run_sync(
                    self.store.commit_chunk, entry.sha256, size, chunk.index, data
                )
                self._count(source.name, len(data))
                self.remaining[entry.sha256] -= 1
                if self.remaining[entry.sha256] == 0:
                    await trio.to_thread.run_sync(self.store.assemble, entry, size)
            except (P2PEdgeError, OSError) as exc:
                self.fail(exc)
                return
            finally:
                sched.finish()

    def fail(self, exc: Exception) -> None:
        """A local failure (disk full, corrupt partial state) ends the whole pull."""
        if self.fatal is None:
            self.fatal = exc
        self.cancel.cancel()

    def _count(self, source: str, nbytes: int) -> None:
        self.result.fetched_chunks += 1
        self.result.fetched_bytes += nbytes
        self.result.by_source[source] = self.result.by_source.get(source, 0) + 1
        update = getattr(self.progress, "update", None)
        if update is not None:
            update(nbytes)


def _progress_bar(total: int, enabled: bool | None, label: str) -> object:
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, desc=label, leave=False)


async def pull(
    model: ModelId,
    store: Store,
    sources: Sequence[ChunkSource],
    trust: TrustStore,
    *,
    manifest: Manifest | None = None,
    files: Iterable[str] | None = None,
    per_source: int = 4,
    chunk_timeout: float = 60.0,
    max_failures: int = 3,
    progress: bool | None = None,
) -> PullResult:
    """Bring ``model`` (or only ``files`` of it, e.g. one shard) into ``store``.

    Returns once every selected blob is in the store and the manifest is recorded; raises
    ``IntegrityError`` (bad/untrusted manifest, or bad chunks with no honest source left),
    ``PullFailed`` (sources lacked or failed chunks) or ``ModelNotCached`` (no manifest).
    """
    started = time.perf_counter()
    if manifest is None:
        manifest = await fetch_manifest(model, sources, trust)
    else:
        manifest.verify(trust)
    entries = manifest.select(files)
    result = PullResult(manifest)
    size = manifest.chunk_size
    chunks: list[_Chunk] = []
    remaining: dict[str, int] = {}
    for entry in entries:
        if entry.sha256 in remaining:
            continue
        if store.has_blob(entry.sha256):
            try:
                await trio.to_thread.run_sync(store.verify_blob, entry.sha256)
                continue
            except IntegrityError:
                pass
        if entry.size == 0:
            await trio.to_thread.run_sync(store.write_blob, entry.sha256, b"")
            continue
        done = await trio.to_thread.run_sync(store.committed_chunks, entry, size)
        result.reused_chunks += len(done)
        todo = [i for i in range(chunk_count(entry.size, size)) if i not in done]
        remaining[entry.sha256] = len(todo)
        if not todo:
            await trio.to_thread.run_sync(store.assemble, entry, size)
        chunks.extend(_Chunk(entry, i) for i in todo)
    need = sum(chunk_length(c.entry.size, size, c.index) for c in chunks)
    await trio.to_thread.run_sync(store.ensure_room, need)
    bar = _progress_bar(need, progress, str(manifest.model)) if chunks else None
    job = _Pull(
        store, manifest, chunks, remaining, result,
        chunk_timeout=chunk_timeout, max_failures=max_failures, progress=bar,
    )  # fmt: skip
    try:
        with job.cancel:
            async with trio.open_nursery() as nursery:
                for source in sources:
                    failures = [0, 0]
                    for _ in range(per_source):
                        nursery.start_soon(job.worker, source, failures)
    finally:
        close = getattr(bar, "close", None)
        if close is not None:
            close()
    if job.fatal is not None:
        raise job.fatal
    result.dropped = dict(job.sched.dropped)
    if job.sched.pending:
        reasons = "; ".join(f"{k}: {v}" for k, v in result.dropped.items()) or "no source had them"
        message = f"{len(job.sched.pending)} chunks of {manifest.model} unavailable ({reasons})"
        if any("sha256 mismatch" in r for r in result.dropped.values()):
            raise ChunkIntegrityError(message)
        raise PullFailed(message)
    await trio.to_thread.run_sync(store.put_manifest, manifest)
    result.seconds = time.perf_counter() - started
    return result


__all__ = [
    "ChunkIntegrityError",
    "PullFailed",
    "PullResult",
    "StoreChunkSource",
    "fetch_manifest",
    "pull",
]
