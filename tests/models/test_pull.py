"""Pulls: verification, resume after a kill, tampering sources, subsets, disk faults."""

from __future__ import annotations

import hashlib
import json
import os
from functools import partial
from pathlib import Path

import pytest
import trio

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
from p2pedge.models.pull import ChunkIntegrityError, PullFailed, StoreChunkSource, pull
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
