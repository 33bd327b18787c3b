"""Pulls: verification, resume after a kill, tampering sources, subsets, disk faults."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from p2pedge.errors import IntegrityError, ModelNotCached, PeerUnavailable
from p2pedge.ids import ModelId
from p2pedge.models.faults import (
    CancellingChunkSource,
    CountingChunkSource,
    DiskFullWriter,
    FlakyChunkSource,
    TamperingChunkSource,
)
from p2pedge.models.keys import BadSignature, TrustStore, UntrustedPublisher, generate_key
from p2pedge.models.keys import public_key_hex as pub
from p2pedge.models.manifest import Manifest, canonical_json, chunk_count
from p2pedge.models.pull import (
    ChunkIntegrityError,
    PullFailed,
    StoreChunkSource,
    fetch_manifest,
    pull,
)
from p2pedge.models.sources import SourceMissing
from p2pedge.models.store import Store, StoreFull
from p2pedge.registry.client import RegistryClient
from p2pedge.registry.server import serve_registry

CHUNK = 4096
MODEL = ModelId("tiny", "1")


class Seed:
    def __init__(self, tmp_path: Path, size: int = 40 * CHUNK + 5) -> None:
        source = tmp_path / "src"
        (source / "sub").mkdir(parents=True)
        (source / "weights.bin").write_bytes(os.urandom(size))
        (source / "sub" / "config.json").write_bytes(b'{"x": 1}')
        self.source = source
        self.key = generate_key()
        self.store = Store(tmp_path / "seed")
        self.manifest: Manifest = self.store.add_model_dir(
            source, "tiny", "1", "llm", self.key, chunk_size=CHUNK
        )
        self.trust = TrustStore([pub(self.key)])
        self.chunks = sum(chunk_count(f.size, CHUNK) for f in self.manifest.files)

    def mirror(self, name: str) -> StoreChunkSource:
        return StoreChunkSource(self.store, name)

    def same_as_source(self, store: Store) -> bool:
        target = store.materialize(MODEL)
        return all(
            (target / f.path).read_bytes() == (self.source / f.path).read_bytes()
            for f in self.manifest.files
        )


def done_chunks(store: Store, manifest: Manifest) -> int:
    """Chunks a resumed pull need not fetch: whole blobs plus committed partial chunks."""
    return sum(
        chunk_count(f.size, CHUNK)
        if store.has_blob(f.sha256)
        else len(store.committed_chunks(f, CHUNK))
        for f in manifest.files
    )


async def test_pull_from_registry_verifies_and_materializes(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    seed = Seed(tmp_path)
    port = await nursery.start(partial(serve_registry, seed.store.root))
    store = Store(tmp_path / "client")
    async with RegistryClient(f"http://127.0.0.1:{port}") as registry:
        result = await pull(ModelId("tiny"), store, [registry], seed.trust, progress=False)
    assert result.fetched_chunks == seed.chunks
    assert result.manifest.model == MODEL
    assert seed.same_as_source(store)
    assert list(store.partial.iterdir()) == []
    again = await pull(MODEL, store, [seed.mirror("m")], seed.trust, progress=False)
    assert again.fetched_chunks == 0


async def test_killed_pull_resumes_fetching_only_in_flight_again(tmp_path: Path) -> None:
    seed = Seed(tmp_path)
    store = Store(tmp_path / "client")
    per_source = 4
    with trio.CancelScope() as scope:
        killer = CancellingChunkSource(seed.mirror("m"), after=15, scope=scope)
        await pull(MODEL, store, [killer], seed.trust, per_source=per_source, progress=False)
    assert scope.cancelled_caught
    assert not store.has_model(MODEL)
    committed = done_chunks(store, seed.manifest)
    assert committed >= killer.delivered - per_source
    counter = CountingChunkSource(seed.mirror("m"))
    result = await pull(MODEL, store, [counter], seed.trust, progress=False)
    assert len(counter.fetches) == seed.chunks - committed
    assert len(counter.fetches) <= seed.chunks - len(killer.fetches) + per_source
    assert result.fetched_chunks == len(counter.fetches)
    assert seed.same_as_source(store)


async def test_tampering_source_is_dropped_and_pull_completes(tmp_path: Path) -> None:
    seed = Seed(tmp_path)
    store = Store(tmp_path / "client")
    evil = TamperingChunkSource(seed.mirror("evil"))
    honest = [CountingChunkSource(seed.mirror(f"honest{i}")) for i in range(2)]
    result = await pull(MODEL, store, [evil, *honest], seed.trust, progress=False)
    assert "evil" in result.dropped and "sha256" in result.dropped["evil"]
    assert "evil" not in result.by_source
    assert len(evil.fetches) <= 4
    assert sum(result.by_source.values()) == seed.chunks
    assert seed.same_as_source(store)


async def test_only_tampering_sources_fail_with_integrity_error(tmp_path: Path) -> None:
    seed = Seed(tmp_path)
    store = Store(tmp_path / "client")
    with pytest.raises(ChunkIntegrityError):
        await pull(MODEL, store, [TamperingChunkSource(seed.mirror("e"))], seed.trust)
    assert not store.has_model(MODEL)
    assert list(store.blobs.iterdir()) == []


async def test_flaky_source_retried_elsewhere(tmp_path: Path) -> None:
    seed = Seed(tmp_path)
    store = Store(tmp_path / "client")
    flaky = FlakyChunkSource(seed.mirror("flaky"), every=2, error=PeerUnavailable("drop"))
    result = await pull(MODEL, store, [flaky, seed.mirror("ok")], seed.trust, progress=False)
    assert seed.same_as_source(store)
    assert sum(result.by_source.values()) == seed.chunks


async def test_missing_everywhere_is_pull_failed(tmp_path: Path) -> None:
    seed = Seed(tmp_path)
    empty = StoreChunkSource(Store(tmp_path / "empty"), "empty")
    with pytest.raises(PullFailed):
        await pull(MODEL, Store(tmp_path / "c"), [empty], seed.trust, manifest=seed.manifest)
    with pytest.raises(ModelNotCached):
        await pull(MODEL, Store(tmp_path / "c"), [empty], seed.trust)


async def test_bad_signature_and_unknown_publisher_refused(tmp_path: Path) -> None:
    seed = Seed(tmp_path)
    raw = json.loads(seed.manifest.to_bytes())
    raw["license"] = "stolen"
    forged = Store(tmp_path / "forged")
    path = forged.manifests / "tiny" / "1.json"
    path.parent.mkdir(parents=True)
    path.write_bytes(canonical_json(raw))
    store = Store(tmp_path / "client")
    with pytest.raises(BadSignature):
        await pull(MODEL, store, [StoreChunkSource(forged, "forged")], seed.trust)
    stranger = TrustStore([pub(generate_key())])
    with pytest.raises(UntrustedPublisher):
        await pull(MODEL, store, [seed.mirror("m")], stranger)
    assert list(store.blobs.iterdir()) == [] and store.list_models() == []
    assert issubclass(BadSignature, IntegrityError)


async def test_subset_pull_fetches_only_that_file(tmp_path: Path) -> None:
    seed = Seed(tmp_path)
    store = Store(tmp_path / "client")
    counter = CountingChunkSource(seed.mirror("m"))
    await pull(MODEL, store, [counter], seed.trust, files=["sub/config.json"], progress=False)
    assert len(counter.fetches) == 1
    assert store.has_model(MODEL, ["sub/config.json"]) and not store.has_model(MODEL)
    assert (store.materialize(MODEL, ["sub/config.json"]) / "sub" / "config.json").is_file()


async def test_disk_full_mid_pull_then_resume(tmp_path: Path) -> None:
    seed = Seed(tmp_path)
    store = Store(tmp_path / "client", writer=DiskFullWriter(capacity=10 * CHUNK + 100))
    with pytest.raises(StoreFull):
        await pull(MODEL, store, [seed.mirror("m")], seed.trust, per_source=1, progress=False)
    assert not store.has_blob(seed.manifest.file("weights.bin").sha256)
    for blob in store.blobs.iterdir():
        assert blob.name == f"sha256-{hashlib.sha256(blob.read_bytes()).hexdigest()}"
    assert not any(p.name.startswith(".tmp-") for p in store.root.rglob("*"))
    done = done_chunks(store, seed.manifest)
    assert done == 11
    store.writer = DiskFullWriter(capacity=1 << 30)
    counter = CountingChunkSource(seed.mirror("m"))
    await pull(MODEL, store, [counter], seed.trust, progress=False)
    assert len(counter.fetches) == seed.chunks - done
    assert seed.same_as_source(store)


@pytest.fixture
def inline_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Store calls run inline instead of in worker threads: an autojump clock jumps
    whenever the event loop waits on a thread, so only then does virtual time measure
    nothing but the waits under test (a source's silence, a deadline, a hedge)."""

    async def inline(fn: Callable[..., Any], *args: Any, **_: Any) -> Any:
        return fn(*args)

    monkeypatch.setattr(trio.to_thread, "run_sync", inline)


class MemorySource:
    """A holder serving chunks and manifests from memory with no thread, so that under a
    mock clock only real waits take time."""

    def __init__(self, name: str, stores: list[Store]) -> None:
        self.name = name
        self.blobs = {d: s.blob_path(d).read_bytes() for s in stores for d in s.blob_digests()}
        self.manifests = {str(m): s.manifest_bytes(m) for s in stores for m in s.list_models()}
        self.versions = sorted(m.rsplit("@", 1)[1] for m in self.manifests)

    async def fetch_chunk(self, digest: str, index: int, chunk_size: int) -> bytes:
        await trio.lowlevel.checkpoint()
        if digest not in self.blobs:
            raise SourceMissing(digest)
        return self.blobs[digest][index * chunk_size : (index + 1) * chunk_size]

    async def fetch_manifest(self, model: ModelId) -> bytes:
        await trio.lowlevel.checkpoint()
        version = self.versions[-1] if model.version == "latest" else model.version
        try:
            return self.manifests[f"{model.name}@{version}"]
        except KeyError:
            raise SourceMissing(str(model)) from None


class HangingSource:
    """A peer that accepts every request and never answers."""

    def __init__(self, name: str = "hang") -> None:
        self.name = name
        self.asked = 0

    async def fetch_chunk(self, digest: str, index: int, chunk_size: int) -> bytes:
        self.asked += 1
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    async def fetch_manifest(self, model: ModelId) -> bytes:
        await trio.sleep_forever()
        raise AssertionError("unreachable")


async def test_hanging_source_cannot_stall_a_pull_others_can_serve(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, inline_threads: None
) -> None:
    seed = Seed(tmp_path)
    hang, honest = HangingSource(), MemorySource("honest", [seed.store])
    store = Store(tmp_path / "client")
    started = trio.current_time()
    result = await pull(
        MODEL, store, [hang, honest], seed.trust, chunk_timeout=30, hedge_after=3, progress=False
    )
    elapsed = trio.current_time() - started
    assert 3 <= elapsed < 30  # hedged after 3 s, long before the per-chunk deadline
    assert result.by_source == {"honest": seed.chunks}
    assert hang.asked == result.hedged == 4  # each chunk it held went to the other source
    assert "slower than others" in result.dropped["hang"]
    assert seed.same_as_source(store)


async def test_per_chunk_deadline_drops_a_source_that_never_answers(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, inline_threads: None
) -> None:
    seed = Seed(tmp_path)
    hang = HangingSource()
    started = trio.current_time()
    with pytest.raises(PullFailed, match="TooSlowError"):
        await pull(
            MODEL, Store(tmp_path / "c"), [hang], seed.trust,
            manifest=seed.manifest, chunk_timeout=7, progress=False,
        )  # fmt: skip
    assert trio.current_time() - started == pytest.approx(7)


def signed_versions(tmp_path: Path, seed: Seed, versions: list[str]) -> Store:
    """A store holding ``versions`` of the model, all signed by the seed's trusted key."""
    store = Store(tmp_path / f"v{'-'.join(versions)}")
    for version in versions:
        store.add_model_dir(seed.source, "tiny", version, "llm", seed.key, chunk_size=CHUNK)
    return store


async def test_latest_is_the_highest_signed_version_any_source_offers(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, inline_threads: None
) -> None:
    seed = Seed(tmp_path)
    old = MemorySource("old", [seed.store])  # answers first, with a valid older version
    new = MemorySource("new", [signed_versions(tmp_path, seed, ["1", "1.10"])])
    newest = MemorySource("newest", [signed_versions(tmp_path, seed, ["1.9"])])
    store = Store(tmp_path / "client")
    result = await pull(ModelId("tiny"), store, [old, HangingSource(), newest, new], seed.trust)
    assert result.manifest.model == ModelId("tiny", "1.10")  # natural order: 1.10 > 1.9
    assert store.versions("tiny") == ["1.10"]
    pinned = await fetch_manifest(ModelId("tiny", "1"), [HangingSource(), old], seed.trust)
    assert pinned.model == MODEL  # a pinned version: the first trusted answer, no waiting


async def test_latest_ignores_untrusted_higher_versions_and_one_named_latest(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, inline_threads: None
) -> None:
    seed = Seed(tmp_path)
    stranger = Store(tmp_path / "stranger")
    stranger.add_model_dir(seed.source, "tiny", "9", "llm", generate_key(), chunk_size=CHUNK)
    literal = MemorySource("literal", [signed_versions(tmp_path, seed, ["latest"])])
    sources = [MemorySource("forger", [stranger]), literal, MemorySource("ok", [seed.store])]
    started = trio.current_time()
    manifest = await fetch_manifest(ModelId("tiny"), sources, seed.trust)
    assert manifest.model == MODEL
    assert trio.current_time() - started < 1  # all answered: no waiting for the grace
