"""The content-addressed local model store.

Layout under ``root``::

    blobs/sha256-<hex>                 immutable file contents, named by their sha256
    manifests/<name>/<version>.json    signed manifests (verified before they were written)
    models/<name>/<version>/...        materialized model dirs (hard links into blobs/)
    partial/<hex>-<chunk_size>/<i>     verified chunks of an unfinished pull (resume state)

Every write goes to a temp file in the destination's directory, is fsynced, renamed into
place and the directory fsynced, so a crash or a full disk never leaves a half-written blob,
chunk or manifest visible under its final name. A blob is re-hashed on its first use after
the store is opened; the result is cached by ``(size, mtime_ns)``, so a blob changed on disk
afterwards (including through a materialized hard link) is hashed again before use. An
in-place edit that keeps both size and mtime is not detected until the next process.

Blocking I/O: call these methods from a worker thread in async code (hashing a blob costs
time in proportion to its size). Materializing is serialised by a lock, so two threads that
both find a model's directory missing do not race to build it.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import shutil
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from p2pedge.errors import IntegrityError, ModelNotCached, P2PEdgeError
from p2pedge.ids import ModelId
from p2pedge.models.keys import TrustStore, load_private_key
from p2pedge.models.manifest import (
    DEFAULT_CHUNK_SIZE,
    FileEntry,
    Manifest,
    build_manifest,
    check_digest,
    chunk_count,
    chunk_length,
    parse_manifest,
    scan_model_dir,
)

Writer = Callable[[BinaryIO, bytes], None]
_BLOB = re.compile(r"^sha256-([0-9a-f]{64})$")
_COPY_PIECE = 1 << 20
_COMPLETE = ".p2pedge-complete"


def store_home() -> Path:
    """Where the command-line tools keep the store and trusted keys: ``$P2PEDGE_HOME``,
    else ``~/.local/share/p2pedge``."""
    return Path(os.environ.get("P2PEDGE_HOME") or Path.home() / ".local" / "share" / "p2pedge")


class StoreFull(P2PEdgeError):
    """The disk budget (after garbage collection) or the disk itself has no room."""


def plain_writer(handle: BinaryIO, data: bytes) -> None:
    handle.write(data)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _version_key(version: str) -> tuple[tuple[int, int | str], ...]:
    """Natural order (``1.10`` after ``1.9``) so ``@latest`` picks the newest."""
    parts = re.findall(r"\d+|[^\d]+", version)
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in parts)


class Store:
    """A model store rooted at ``root``; ``writer`` exists so tests can inject disk faults."""

    def __init__(
        self,
        root: Path,
        *,
        budget_bytes: int | None = None,
        writer: Writer = plain_writer,
    ) -> None:
        self.root = Path(root)
        self.budget_bytes = budget_bytes
        self.writer = writer
        self.blobs = self.root / "blobs"
        self.manifests = self.root / "manifests"
        self.models = self.root / "models"
        self.partial = self.root / "partial"
        for path in (self.blobs, self.manifests, self.models, self.partial):
            path.mkdir(parents=True, exist_ok=True)
        self._verified: dict[str, tuple[int, int]] = {}
        self._materializing = threading.Lock()

    # -- atomic writes -------------------------------------------------------------------

    @contextmanager
    def _atomic(self, final: Path) -> Iterator[BinaryIO]:
        """Yield a temp file next to ``final``; rename it into place only on success."""
        final.parent.mkdir(parents=True, exist_ok=True)
        temp = final.parent / f".tmp-{uuid.uuid4().hex}"
        try:
            with open(temp, "xb") as handle:
                yield handle
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temp, final)
            _fsync_dir(final.parent)
        except BaseException as exc:
            temp.unlink(missing_ok=True)
            if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise StoreFull(f"disk full while writing {final.name}") from exc
            raise

    def _write_bytes(self, final: Path, data: bytes) -> None:
        with self._atomic(final) as handle:
            self.writer(handle, data)

    # -- blobs -----------------------------------------------------------------------------

    def blob_path(self, digest: str) -> Path:
        return self.blobs / f"sha256-{check_digest(digest)}"

    def has_blob(self, digest: str) -> bool:
        return self.blob_path(digest).is_file()

    def blob_digests(self) -> list[str]:
        return sorted(m.group(1) for p in self.blobs.iterdir() if (m := _BLOB.match(p.name)))

    def verify_blob(self, digest: str) -> Path:
        """The blob's path once its bytes are known to match; a corrupt blob is deleted."""
        path = self.blob_path(digest)
        try:
            stat = path.stat()
        except FileNotFoundError as exc:
            raise ModelNotCached(f"blob sha256-{digest}") from exc
        stamp = (stat.st_size, stat.st_mtime_ns)
        if self._verified.get(digest) == stamp:
            return path
        hasher = hashlib.sha256()
        with open(path, "rb") as handle:
            while piece := handle.read(_COPY_PIECE):
                hasher.update(piece)
        if hasher.hexdigest() != digest:
            self._verified.pop(digest, None)
            path.unlink(missing_ok=True)
            raise IntegrityError(f"blob sha256-{digest[:16]}… is corrupt; removed")
        self._verified[digest] = stamp
        return path

    def _write_blob_stream(self, digest: str, pieces: Iterable[bytes]) -> Path:
        final = self.blob_path(digest)
        hasher = hashlib.sha256()
        with self._atomic(final) as handle:
            for piece in pieces:
                hasher.update(piece)
                self.writer(handle, piece)
            if hasher.hexdigest() != digest:
                raise IntegrityError(f"content does not match sha256-{digest[:16]}…")
        self._verified[digest] = (final.stat().st_size, final.stat().st_mtime_ns)
        return final

    def write_blob(self, digest: str, data: bytes) -> Path:
        return self._write_blob_stream(digest, [data])

    def write_blob_from(self, digest: str, source: BinaryIO) -> Path:
        """Stream ``source`` into a blob; a hash mismatch leaves nothing behind."""
        return self._write_blob_stream(digest, iter(lambda: source.read(_COPY_PIECE), b""))

    def read_range(self, digest: str, offset: int, length: int) -> bytes:
        path = self.verify_blob(digest)
        with open(path, "rb") as handle:
            handle.seek(offset)
            return handle.read(length)

    def read_chunk(self, digest: str, index: int, chunk_size: int) -> bytes:
        return self.read_range(digest, index * chunk_size, chunk_size)

    # -- partial pulls (resume state) -----------------------------------------------------

    def _partial_dir(self, digest: str, chunk_size: int) -> Path:
        return self.partial / f"{check_digest(digest)}-{int(chunk_size)}"

    def commit_chunk(self, digest: str, chunk_size: int, index: int, data: bytes) -> None:
        """Durably keep one chunk that the caller has already verified."""
        self._write_bytes(self._partial_dir(digest, chunk_size) / str(index), data)

    def committed_chunks(self, entry: FileEntry, chunk_size: int) -> set[int]:
        """Indexes already on disk whose bytes still match; bad ones are deleted."""
        folder = self._partial_dir(entry.sha256, chunk_size)
        if not folder.is_dir():
            return set()
        done: set[int] = set()
        for path in folder.iterdir():
            if not path.name.isdigit() or int(path.name) >= len(entry.chunks):
                path.unlink(missing_ok=True)
                continue
            index = int(path.name)
            if hashlib.sha256(path.read_bytes()).hexdigest() == entry.chunks[index]:
                done.add(index)
            else:
                path.unlink(missing_ok=True)
        return done

    def assemble(self, entry: FileEntry, chunk_size: int) -> Path:
        """Join a file's committed chunks into its blob, then drop the partial state."""
        folder = self._partial_dir(entry.sha256, chunk_size)
        count = chunk_count(entry.size, chunk_size)

        def pieces() -> Iterator[bytes]:
            for index in range(count):
                data = (folder / str(index)).read_bytes()
                if len(data) != chunk_length(entry.size, chunk_size, index):
                    raise IntegrityError(f"partial chunk {index} of {entry.path} has wrong size")
                yield data

        path = self._write_blob_stream(entry.sha256, pieces())
        shutil.rmtree(folder, ignore_errors=True)
        return path

    # -- manifests -------------------------------------------------------------------------

    def _manifest_path(self, model: ModelId) -> Path:
        return self.manifests / model.name / f"{model.version}.json"

    def put_manifest(self, manifest: Manifest) -> None:
        """Record a manifest whose signature the caller has verified and whose blobs exist."""
        self._write_bytes(self._manifest_path(manifest.model), manifest.to_bytes())

    def names(self) -> list[str]:
        return sorted(p.name for p in self.manifests.iterdir() if p.is_dir())

    def versions(self, name: str) -> list[str]:
        folder = self.manifests / ModelId(name).name
        if not folder.is_dir():
            return []
        found = [p.stem for p in folder.glob("*.json") if not p.name.startswith(".")]
        return sorted(found, key=_version_key)

    def list_models(self) -> list[ModelId]:
        return [ModelId(n, v) for n in self.names() for v in self.versions(n)]

    def resolve(self, model: ModelId) -> ModelId:
        """Pin ``@latest`` to the newest stored version (a literal ``latest`` wins)."""
        versions = self.versions(model.name)
        if model.version in versions:
            return model
        if model.version == "latest" and versions:
            return ModelId(model.name, versions[-1])
        raise ModelNotCached(str(model))

    def manifest_bytes(self, model: ModelId) -> bytes:
        try:
            return self._manifest_path(self.resolve(model)).read_bytes()
        except FileNotFoundError as exc:
            raise ModelNotCached(str(model)) from exc

    def manifest_size(self, model: ModelId) -> int:
        """The stored manifest's length in bytes, from a stat: cheap enough for the event
        loop, where reading (up to 8 MiB) or parsing it is not."""
        try:
            return self._manifest_path(self.resolve(model)).stat().st_size
        except FileNotFoundError as exc:
            raise ModelNotCached(str(model)) from exc

    def get_manifest(self, model: ModelId, trust: TrustStore | None = None) -> Manifest:
        manifest = parse_manifest(self.manifest_bytes(model))
        if trust is not None:
            manifest.verify(trust)
        return manifest

    def has_model(self, model: ModelId, paths: Iterable[str] | None = None) -> bool:
        """The manifest is stored and the blobs of ``paths`` (default all) are present."""
        try:
            manifest = self.get_manifest(model)
        except ModelNotCached:
            return False
        return all(self.has_blob(f.sha256) for f in manifest.select(paths))

    def held_paths(self, model: ModelId) -> list[str]:
        """The paths of ``model``'s files whose blobs are here (all of them, or a shard's)."""
        return [f.path for f in self.get_manifest(model).files if self.has_blob(f.sha256)]

    def remove_model(self, model: ModelId) -> None:
        """Forget a model; its blobs go at the next :meth:`gc` unless shared."""
        model = self.resolve(model)
        shutil.rmtree(self.models / model.name / model.version, ignore_errors=True)
        self._manifest_path(model).unlink(missing_ok=True)

    # -- publishing and materializing ----------------------------------------------------

    def add_model_dir(
        self,
        directory: Path,
        name: str,
        version: str,
        category: str,
        key: Ed25519PrivateKey | Path,
        *,
        tags: Iterable[str] = (),
        license: str = "unknown",
        chunk_size: int = DEFAULT_CHUNK_SIZE,
    ) -> Manifest:
        """Import a model directory into blobs and store its signed manifest (local publish)."""
        signer = key if isinstance(key, Ed25519PrivateKey) else load_private_key(Path(key))
        entries = scan_model_dir(Path(directory), chunk_size)
        self.ensure_room(sum(e.size for e in entries if not self.has_blob(e.sha256)))
        for entry in entries:
            if not self.has_blob(entry.sha256):
                with open(Path(directory) / entry.path, "rb") as source:
                    self.write_blob_from(entry.sha256, source)
        manifest = build_manifest(
            Path(directory), ModelId(name, version), category, signer,
            tags=tags, license=license, chunk_size=chunk_size, files=entries,
        )  # fmt: skip
        self.put_manifest(manifest)
        return manifest

    def materialize(self, model: ModelId, paths: Sequence[str] | None = None) -> Path:
        """A directory with the model's original file names, ready for onnxruntime-genai."""
        with self._materializing:
            return self._materialize(model, paths)

    def _materialize(self, model: ModelId, paths: Sequence[str] | None) -> Path:
        manifest = self.get_manifest(model)
        entries = manifest.select(paths)
        target = self.models / manifest.model.name / manifest.model.version
        stamp = hashlib.sha256(manifest.to_bytes()).hexdigest()
        for entry in entries:
            self.verify_blob(entry.sha256)
        marker = target / _COMPLETE
        if (
            marker.is_file()
            and marker.read_text() == stamp
            and all(
                (target / e.path).is_file() and (target / e.path).stat().st_size == e.size
                for e in entries
            )
        ):
            return target
        building = target.parent / f".tmp-{manifest.model.version}-{uuid.uuid4().hex}"
        try:
            for entry in entries:
                dest = building / entry.path
                dest.parent.mkdir(parents=True, exist_ok=True)
                if _is_external_data(entry.path):
                    shutil.copyfile(self.blob_path(entry.sha256), dest)
                    continue
                try:
                    os.link(self.blob_path(entry.sha256), dest)
                except OSError:
                    shutil.copyfile(self.blob_path(entry.sha256), dest)
            (building / _COMPLETE).write_text(stamp)
            shutil.rmtree(target, ignore_errors=True)
            os.replace(building, target)
        finally:
            shutil.rmtree(building, ignore_errors=True)
        return target

    # -- space -----------------------------------------------------------------------------

    def usage(self) -> int:
        """Bytes held in blobs and partial chunks (materialized hard links cost nothing)."""
        total = 0
        for folder in (self.blobs, self.partial):
            for path in folder.rglob("*"):
                if path.is_file():
                    total += path.stat().st_size
        return total

    def referenced(self) -> set[str]:
        refs: set[str] = set()
        for model in self.list_models():
            try:
                refs.update(f.sha256 for f in self.get_manifest(model).files)
            except IntegrityError:
                continue
        return refs

    def gc(self, *, drop_partial: bool = False) -> int:
        """Delete blobs no manifest references and stray temp files; returns bytes freed."""
        refs = self.referenced()
        freed = 0
        for path in list(self.blobs.iterdir()):
            match = _BLOB.match(path.name)
            if match is None or match.group(1) not in refs:
                freed += path.stat().st_size
                path.unlink(missing_ok=True)
                if match is not None:
                    self._verified.pop(match.group(1), None)
        if drop_partial:
            for folder in list(self.partial.iterdir()):
                freed += sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
                shutil.rmtree(folder, ignore_errors=True)
        for name_dir in list(self.models.iterdir()):
            for version_dir in list(name_dir.iterdir()) if name_dir.is_dir() else []:
                version = version_dir.name
                if (
                    version.startswith(".tmp-")
                    or not self._manifest_path(ModelId(name_dir.name, version)).is_file()
                ):
                    shutil.rmtree(version_dir, ignore_errors=True)
        return freed

    def ensure_room(self, nbytes: int) -> None:
        """Make room for ``nbytes`` more under the budget (GC first) or raise StoreFull."""
        if self.budget_bytes is None or nbytes <= 0:
            return
        if self.usage() + nbytes <= self.budget_bytes:
            return
        self.gc()
        used = self.usage()
        if used + nbytes > self.budget_bytes:
            raise StoreFull(
                f"need {nbytes} bytes, {used} of budget {self.budget_bytes} used by live models"
            )

    def describe(self, model: ModelId) -> dict[str, object]:
        """A short JSON-able summary (used by the registry's listing)."""
        manifest = self.get_manifest(model)
        return {
            "name": manifest.model.name,
            "version": manifest.model.version,
            "category": manifest.category,
            "tags": list(manifest.tags),
            "size": manifest.total_size,
            "arch": dict(manifest.arch),
        }


def _is_external_data(path: str) -> bool:
    """ONNX external weights: onnx refuses to read them through a file with several hard
    links (a "potential hardlink attack"), so these are copied, not linked."""
    return path.endswith((".data", ".onnx_data", ".onnx.data"))
