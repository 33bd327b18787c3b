"""The content-addressed store: atomic writes, verification, materialize, GC, disk faults."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from p2pedge.errors import IntegrityError, ModelNotCached
from p2pedge.ids import ModelId
from p2pedge.models.faults import DiskFullWriter
from p2pedge.models.keys import generate_key
from p2pedge.models.manifest import Manifest
from p2pedge.models.store import Store, StoreFull

CHUNK = 4096


def make_dir(root: Path, name: str = "m", size: int = 5 * CHUNK + 3) -> Path:
    model = root / name
    (model / "sub").mkdir(parents=True)
    (model / "weights.bin").write_bytes(os.urandom(size))
    (model / "sub" / "config.json").write_bytes(b'{"x": 1}')
    return model


def publish(store: Store, source: Path, version: str = "1") -> Manifest:
    return store.add_model_dir(source, "tiny", version, "llm", generate_key(), chunk_size=CHUNK)


def visible_files(store: Store) -> list[str]:
    return sorted(
        p.relative_to(store.root).as_posix()
        for p in store.root.rglob("*")
        if p.is_file() and not p.name.startswith(".tmp-")
    )


def test_add_and_materialize_hard_links(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    source = make_dir(tmp_path)
    manifest = publish(store, source)
    assert store.has_model(ModelId("tiny", "1"))
    assert store.resolve(ModelId("tiny")) == ModelId("tiny", "1")
    target = store.materialize(ModelId("tiny", "1"))
    assert target == store.root / "models" / "tiny" / "1"
    for entry in manifest.files:
        assert (target / entry.path).read_bytes() == (source / entry.path).read_bytes()
        assert (target / entry.path).stat().st_ino == store.blob_path(entry.sha256).stat().st_ino
    assert store.materialize(ModelId("tiny", "1")) == target


def test_materialized_tiny_model_loads_in_genai(tmp_path: Path) -> None:
    og = pytest.importorskip("onnxruntime_genai")
    from p2pedge.testing.tiny import build_tiny_model

    source = build_tiny_model(tmp_path / "tiny-src")
    store = Store(tmp_path / "store")
    store.add_model_dir(source, "tiny", "1", "llm", generate_key(), chunk_size=CHUNK)
    model = og.Model(str(store.materialize(ModelId("tiny", "1"))))
    assert model is not None


def test_latest_is_natural_order(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    for version in ("1.9", "1.10", "1.2"):
        publish(store, make_dir(tmp_path, f"m{version}"), version)
    assert store.versions("tiny") == ["1.2", "1.9", "1.10"]
    assert store.resolve(ModelId("tiny")).version == "1.10"
    with pytest.raises(ModelNotCached):
        store.resolve(ModelId("nope"))


def test_corrupt_blob_detected_before_use(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    manifest = publish(store, make_dir(tmp_path))
    digest = manifest.file("weights.bin").sha256
    path = store.blob_path(digest)
    data = bytearray(path.read_bytes())
    data[10] ^= 1
    path.write_bytes(bytes(data))
    os.utime(path, ns=(1, 1))
    fresh = Store(tmp_path / "store")
    with pytest.raises(IntegrityError):
        fresh.materialize(ModelId("tiny", "1"))
    assert not path.exists()
    assert not fresh.has_model(ModelId("tiny", "1"))


def test_verify_cache_rehashes_after_change(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    manifest = publish(store, make_dir(tmp_path))
    digest = manifest.file("weights.bin").sha256
    store.verify_blob(digest)
    path = store.blob_path(digest)
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(IntegrityError):
        store.read_chunk(digest, 0, CHUNK)


def test_write_blob_refuses_wrong_content_and_leaves_nothing(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    with pytest.raises(IntegrityError):
        store.write_blob(hashlib.sha256(b"a").hexdigest(), b"b")
    assert list(store.blobs.iterdir()) == []


def test_disk_full_leaves_store_consistent(tmp_path: Path) -> None:
    source = make_dir(tmp_path, size=20 * CHUNK)
    writer = DiskFullWriter(capacity=10 * CHUNK)
    store = Store(tmp_path / "store", writer=writer)
    with pytest.raises(StoreFull):
        publish(store, source)
    assert writer.written == 10 * CHUNK
    assert not store.has_model(ModelId("tiny", "1"))
    for name in os.listdir(store.blobs):
        digest = name.removeprefix("sha256-")
        assert hashlib.sha256((store.blobs / name).read_bytes()).hexdigest() == digest
    assert not any(p.name.startswith(".tmp-") for p in store.root.rglob("*"))
    store.writer = DiskFullWriter(capacity=1 << 30)
    manifest = publish(store, source)
    assert store.materialize(manifest.model).is_dir()


def test_disk_full_while_committing_chunk(tmp_path: Path) -> None:
    store = Store(tmp_path / "store", writer=DiskFullWriter(capacity=CHUNK + 10))
    digest = "ab" * 32
    store.commit_chunk(digest, CHUNK, 0, b"x" * CHUNK)
    with pytest.raises(StoreFull):
        store.commit_chunk(digest, CHUNK, 1, b"y" * CHUNK)
    assert visible_files(store) == [f"partial/{digest}-{CHUNK}/0"]


def test_gc_removes_only_unreferenced(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    keep = publish(store, make_dir(tmp_path, "a"), "1")
    drop = publish(store, make_dir(tmp_path, "b"), "2")
    store.materialize(drop.model)
    store.remove_model(drop.model)
    freed = store.gc()
    assert freed == drop.file("weights.bin").size
    assert store.has_model(keep.model)
    assert not store.has_blob(drop.file("weights.bin").sha256)
    assert not (store.models / "tiny" / "2").exists()


def test_budget_collects_then_refuses(tmp_path: Path) -> None:
    store = Store(tmp_path / "store", budget_bytes=8 * CHUNK)
    first = publish(store, make_dir(tmp_path, "a"), "1")
    store.remove_model(first.model)
    second = publish(store, make_dir(tmp_path, "b"), "2")
    assert not store.has_blob(first.file("weights.bin").sha256)
    with pytest.raises(StoreFull):
        publish(store, make_dir(tmp_path, "c"), "3")
    assert store.has_model(second.model)
