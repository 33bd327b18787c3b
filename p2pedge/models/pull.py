"""Pull a model into the local store from many sources at once, verifying every chunk.

Every source is asked for the manifest at once; a pinned version is the first one signed
by a trusted publisher, ``@latest`` the highest signed version any source offers.
Missing chunks go into one shared queue; each source runs ``per_source`` workers that take
the next chunk that source has not said it lacks, so fast sources take more work (work
stealing). No source can stall a pull that others can serve: each chunk has a deadline,
and a chunk in flight for long (``hedge_after``, or four times the median chunk time) is
asked of a second source too, the first good answer winning. A chunk is hashed against the
manifest before it is committed to ``partial/``; a wrong hash drops that source for the
rest of the pull and puts the chunk back for the others. Committed chunks survive a killed
pull, so a re-run fetches only what is missing.
"""

from __future__ import annotations

import hashlib
import math
import statistics
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
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
from p2pedge.models.store import _version_key as version_key

MAX_BUSY = 100
LATEST_GRACE = 5.0
TRANSIENT: tuple[type[BaseException], ...] = (
    PeerUnavailable,
    RemoteProtocolError,
    trio.TooSlowError,
)

_UNANSWERED: tuple[type[BaseException], ...] = (SourceMissing, Busy, *TRANSIENT)


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
    hedged: int = 0  # chunks also asked of a second source because the first was slow
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
    model: ModelId,
    sources: Sequence[ChunkSource],
    trust: TrustStore,
    *,
    timeout: float = 30.0,
) -> Manifest:
    """A trusted manifest of ``model``, asked of every manifest source at once, each
    within ``timeout`` (a hanging source cannot stall the pull).

    A pinned version is the first trusted answer. ``@latest`` waits for every source (for
    ``LATEST_GRACE`` seconds more once one answered) and takes the highest signed version
    any trusted source offers, so a peer serving an older (validly signed) version cannot
    hold a puller back; a version literally named ``latest`` is ignored there. Integrity
    failures outrank absence in the error.
    """
    askable = [s for s in sources if isinstance(s, ManifestSource)]
    latest = model.version == "latest"
    found: list[tuple[int, Manifest]] = []
    errors: list[str] = []
    integrity: list[IntegrityError] = []

    async def ask(position: int, source: ManifestSource, done: trio.CancelScope) -> None:
        try:
            with trio.fail_after(timeout):
                data = await source.fetch_manifest(model)
            # up to 8 MiB of a peer's JSON: parsed and verified off the event loop's thread
            manifest = await trio.to_thread.run_sync(load_verified, data, trust, model)
        except IntegrityError as exc:
            integrity.append(exc)
            errors.append(f"{source.name}: {exc}")
            return
        except _UNANSWERED as exc:
            errors.append(f"{source.name}: {type(exc).__name__}: {exc}")
            return
        if latest and manifest.model.version == "latest":
            errors.append(f"{source.name}: offered a version named 'latest'")
            return
        found.append((position, manifest))
        if not latest:
            done.cancel()
        elif len(found) == 1:  # the others get a little longer, not the whole timeout
            done.deadline = min(done.deadline, trio.current_time() + LATEST_GRACE)

    with trio.CancelScope() as done:
        async with trio.open_nursery() as nursery:
            for position, source in enumerate(askable):
                nursery.start_soon(ask, position, source, done)
    if found:
        if not latest:
            return min(found, key=lambda item: item[0])[1]
        return max(found, key=lambda item: (version_key(item[1].model.version), -item[0]))[1]
    if integrity:
        raise integrity[0]
    raise ModelNotCached(f"{model} ({'; '.join(errors) or 'no manifest source'})")


@dataclass
class _Flight:
    """One chunk being fetched, by one source or (hedged) two."""

    chunk: _Chunk
    started: float
    tried: set[str] = field(default_factory=set)
    scopes: dict[str, trio.CancelScope] = field(default_factory=dict)
    done: bool = False


class _Scheduler:
    """The shared chunk queue; wakes idle workers whenever its state changes.

    A chunk in flight longer than :meth:`hedge_delay` may be taken by one more source
    (a hedged request); the first good answer wins and cancels the other attempt.
    """

    def __init__(self, chunks: Iterable[_Chunk], hedge_after: float, hedges: int) -> None:
        self.pending: deque[_Chunk] = deque(chunks)
        self.flights: dict[tuple[str, int], _Flight] = {}
        self.lacks: dict[str, set[str]] = {}
        self.dropped: dict[str, str] = {}
        self.hedge_after = hedge_after
        self.hedges = hedges
        self.hedged = 0
        self.durations: deque[float] = deque(maxlen=32)
        self._changed = trio.Event()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def hedge_delay(self) -> float:
        """``hedge_after``, or four times the median chunk time once that is longer."""
        if not self.durations:
            return self.hedge_after
        return max(self.hedge_after, 4 * statistics.median(self.durations))

    def _hedgeable(self, source: str, flight: _Flight) -> bool:
        return (
            not flight.done
            and source not in flight.tried
            and len(flight.scopes) < self.hedges
            and flight.chunk.entry.sha256 not in self.lacks.get(source, set())
        )

    def take(self, source: str, now: float) -> _Flight | None:
        """A pending chunk this source may hold, else an overdue one to hedge."""
        lacking = self.lacks.get(source, set())
        for position, chunk in enumerate(self.pending):
            if chunk.entry.sha256 not in lacking:
                del self.pending[position]
                flight = _Flight(chunk, now)
                self.flights[(chunk.entry.sha256, chunk.index)] = flight
                return self._attempt(flight, source)
        due = now - self.hedge_delay()
        for flight in self.flights.values():
            if flight.started <= due and self._hedgeable(source, flight):
                self.hedged += 1
                return self._attempt(flight, source)
        return None

    def _attempt(self, flight: _Flight, source: str) -> _Flight:
        flight.tried.add(source)
        flight.scopes[source] = trio.CancelScope()
        return flight

    def next_hedge(self, source: str) -> float:
        """When a chunk in flight becomes hedgeable for ``source`` (inf: none will)."""
        starts = [f.started for f in self.flights.values() if self._hedgeable(source, f)]
        return min(starts) + self.hedge_delay() if starts else math.inf

    def won(self, flight: _Flight, source: str, seconds: float) -> bool:
        """``source`` brought good bytes: True if first (the others are cancelled)."""
        del flight.scopes[source]
        if flight.done:
            return False
        flight.done = True
        self.durations.append(seconds)
        for scope in flight.scopes.values():
            scope.cancel()
        return True

    def lost(self, flight: _Flight, source: str) -> None:
        """This attempt failed or was cancelled; the chunk is queued again if it was the
        last attempt and nobody delivered it."""
        flight.scopes.pop(source, None)
        if not flight.done and not flight.scopes:
            del self.flights[(flight.chunk.entry.sha256, flight.chunk.index)]
            self.pending.appendleft(flight.chunk)
        self._notify()

    def finish(self, flight: _Flight) -> None:
        self.flights.pop((flight.chunk.entry.sha256, flight.chunk.index), None)
        self._notify()

    def drop(self, source: str, reason: str) -> None:
        """Stop using ``source`` for this pull; its attempts in flight are cancelled."""
        self.dropped.setdefault(source, reason)
        for flight in self.flights.values():
            if source in flight.scopes:
                flight.scopes[source].cancel()
        self._notify()

    def lack(self, source: str, digest: str) -> None:
        self.lacks.setdefault(source, set()).add(digest)

    async def wait(self, source: str) -> None:
        """Until something changes or a chunk becomes hedgeable for ``source``."""
        with trio.move_on_at(self.next_hedge(source)):
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
        hedge_after: float,
        max_failures: int,
        progress: object,
        on_bytes: Callable[[int], None] | None,
    ) -> None:
        self.store = store
        self.manifest = manifest
        self.sched = _Scheduler(chunks, hedge_after, hedges=2)
        self.remaining = remaining
        self.result = result
        self.chunk_timeout = chunk_timeout
        self.max_failures = max_failures
        self.progress = progress
        self.on_bytes = on_bytes
        self.fatal: Exception | None = None
        self.cancel = trio.CancelScope()

    async def worker(self, source: ChunkSource, failures: list[int]) -> None:
        """Fetch chunks for one source; ``failures`` = [errors in a row, busy in a row].

        Each chunk has ``chunk_timeout`` (a hanging source fails it, and after
        ``max_failures`` in a row is dropped); losing a hedge race counts as a failure too,
        so a source that never answers stops taking chunks from others."""
        sched = self.sched
        size = self.manifest.chunk_size
        while source.name not in sched.dropped:
            flight = sched.take(source.name, trio.current_time())
            if flight is None:
                if not sched.flights:  # nothing will come back to the queue
                    return
                await sched.wait(source.name)
                continue
            chunk, entry = flight.chunk, flight.chunk.entry
            started = trio.current_time()
            attempt = flight.scopes[source.name]
            data = b""
            try:
                with attempt, trio.fail_after(self.chunk_timeout):
                    data = await source.fetch_chunk(entry.sha256, chunk.index, size)
            except SourceMissing:
                sched.lack(source.name, entry.sha256)
                sched.lost(flight, source.name)
                continue
            except Busy:
                sched.lost(flight, source.name)
                failures[1] += 1
                if failures[1] >= MAX_BUSY:
                    sched.drop(source.name, "busy for too long")
                await trio.sleep(min(1.0, 0.01 * failures[1]))
                continue
            except TRANSIENT as exc:
                self._strike(source.name, failures, f"{type(exc).__name__}: {exc}")
                sched.lost(flight, source.name)
                continue
            if flight.done or attempt.cancelled_caught:  # another delivered it, or dropped
                if flight.done and attempt.cancelled_caught:
                    self._strike(source.name, failures, "slower than others, repeatedly")
                sched.lost(flight, source.name)
                continue
            expected = chunk_length(entry.size, size, chunk.index)
            if (
                len(data) != expected
                # a whole chunk's hash is too long a step for the event loop's thread
                or await trio.to_thread.run_sync(_sha256_hex, data) != entry.chunks[chunk.index]
            ):
                sched.drop(
                    source.name, f"bad chunk {chunk.index} of {entry.path} (sha256 mismatch)"
                )
                sched.lost(flight, source.name)
                continue
            if not sched.won(flight, source.name, trio.current_time() - started):
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
                sched.finish(flight)

    def _strike(self, source: str, failures: list[int], reason: str) -> None:
        failures[0] += 1
        if failures[0] >= self.max_failures:
            self.sched.drop(source, reason)

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
        if self.on_bytes is not None:
            self.on_bytes(nbytes)


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
    chunk_timeout: float = 30.0,
    hedge_after: float = 3.0,
    max_failures: int = 3,
    progress: bool | None = None,
    on_bytes: Callable[[int], None] | None = None,
) -> PullResult:
    """Bring ``model`` (or only ``files`` of it, e.g. one shard) into ``store``.

    ``on_bytes(n)`` is called for every chunk as it is committed (verified bytes, whatever
    the source), so a node's counters move while a long pull runs.

    Returns once every selected blob is in the store and the manifest is recorded; raises
    ``IntegrityError`` (bad/untrusted manifest, or bad chunks with no honest source left),
    ``PullFailed`` (sources lacked or failed chunks) or ``ModelNotCached`` (no manifest).
    """
    started = time.perf_counter()
    if manifest is None:
        manifest = await fetch_manifest(model, sources, trust, timeout=chunk_timeout)
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
        chunk_timeout=chunk_timeout, hedge_after=hedge_after, max_failures=max_failures,
        progress=bar, on_bytes=on_bytes,
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
    result.hedged = job.sched.hedged
    if job.sched.pending:
        reasons = "; ".join(f"{k}: {v}" for k, v in result.dropped.items()) or "no source had them"
        message = f"{len(job.sched.pending)} chunks of {manifest.model} unavailable ({reasons})"
        if any("sha256 mismatch" in r for r in result.dropped.values()):
            raise ChunkIntegrityError(message)
        raise PullFailed(message)
    await trio.to_thread.run_sync(store.put_manifest, manifest)
    result.seconds = time.perf_counter() - started
    return result


def _sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


__all__ = [
    "ChunkIntegrityError",
    "PullFailed",
    "PullResult",
    "StoreChunkSource",
    "fetch_manifest",
    "pull",
]
