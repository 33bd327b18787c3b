"""Signed model manifests: what a model is made of, down to each chunk's hash.

A manifest names ``name@version``, its category, tags, architecture facts (copied from the
importer's ``p2pedge_model.json``), license, and every file with its size, sha256 and the
sha256 of each fixed-size chunk, so any chunk from any source can be checked before it is
kept. The publisher signs the canonical JSON (sorted keys, no whitespace, UTF-8) of every
field except ``signature``; unknown fields are signed too, so newer publishers can add
fields (e.g. shard groups) without breaking older verifiers. Files are independent, so a
subset (one shard's files) can be pulled alone.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from p2pedge.errors import IntegrityError
from p2pedge.ids import ModelId
from p2pedge.models.keys import TrustStore, public_key_hex, verify_signature
from p2pedge.records.facts import FACTS_FILE

FORMAT = 1
DEFAULT_CHUNK_SIZE = 4 * 1024 * 1024
MIN_CHUNK_SIZE = 1024
MAX_CHUNK_SIZE = 4 * 1024 * 1024
MAX_MANIFEST_BYTES = 8 * 1024 * 1024
MAX_FILES = 4096
ARCH_FILE = FACTS_FILE
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_PART = re.compile(r"^[A-Za-z0-9._+-][A-Za-z0-9._+ -]{0,254}$")


class ManifestError(IntegrityError):
    """A manifest is malformed (bad field, unsafe path, inconsistent chunk list)."""


def canonical_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def check_relative_path(path: str) -> str:
    """Refuse anything that could escape a model directory (``..``, absolute, odd names)."""
    if not isinstance(path, str) or not path or "\\" in path or "\x00" in path:
        raise ManifestError(f"unsafe file path {path!r}")
    pure = PurePosixPath(path)
    if pure.is_absolute() or str(pure) != path:
        raise ManifestError(f"file path {path!r} is not a normalised relative path")
    for part in pure.parts:
        if part in (".", "..") or not _PART.match(part):
            raise ManifestError(f"unsafe file path component {part!r} in {path!r}")
    return path


def check_digest(value: object) -> str:
    if not isinstance(value, str) or not _HEX64.match(value):
        raise ManifestError(f"not a sha256 hex digest: {value!r}")
    return value


def chunk_count(size: int, chunk_size: int) -> int:
    return max(1, -(-size // chunk_size))


def chunk_length(size: int, chunk_size: int, index: int) -> int:
    """Bytes in chunk ``index`` of a ``size``-byte blob (the last one may be short)."""
    return max(0, min(chunk_size, size - index * chunk_size))


@dataclass(frozen=True)
class FileEntry:
    path: str
    size: int
    sha256: str
    chunks: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "size": self.size,
            "sha256": self.sha256,
            "chunks": list(self.chunks),
        }


@dataclass(frozen=True)
class Manifest:
    """A parsed manifest; ``raw`` is exactly what was signed (plus the signature)."""

    model: ModelId
    category: str
    tags: tuple[str, ...]
    license: str
    arch: Mapping[str, Any]
    chunk_size: int
    files: tuple[FileEntry, ...]
    publisher: str
    signature: str
    raw: Mapping[str, Any]

    @property
    def total_size(self) -> int:
        return sum(f.size for f in self.files)

    def file(self, path: str) -> FileEntry:
        for entry in self.files:
            if entry.path == path:
                return entry
        raise KeyError(path)

    def select(self, paths: Iterable[str] | None) -> tuple[FileEntry, ...]:
        """The entries named by ``paths`` (all when ``None``): a shard pulls only its files."""
        if paths is None:
            return self.files
        wanted = set(paths)
        chosen = tuple(f for f in self.files if f.path in wanted)
        missing = wanted - {f.path for f in chosen}
        if missing:
            raise KeyError(f"not in manifest: {sorted(missing)}")
        return chosen

    def to_bytes(self) -> bytes:
        return canonical_json(dict(self.raw))

    def signed_bytes(self) -> bytes:
        return canonical_json({k: v for k, v in self.raw.items() if k != "signature"})

    def verify(self, trust: TrustStore) -> None:
        """Raise ``UntrustedPublisher`` or ``BadSignature`` (both ``IntegrityError``)."""
        trust.require(self.publisher)
        verify_signature(self.publisher, self.signature, self.signed_bytes())


def _require(raw: Mapping[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    value = raw.get(key)
    if isinstance(value, bool) or not isinstance(value, kind):
        raise ManifestError(f"manifest field {key!r} missing or not {kind}")
    return value


def _parse_file(raw: object, chunk_size: int) -> FileEntry:
    if not isinstance(raw, dict):
        raise ManifestError("file entry is not an object")
    path = check_relative_path(_require(raw, "path", str))
    size = _require(raw, "size", int)
    if size < 0:
        raise ManifestError(f"negative size for {path}")
    chunks = _require(raw, "chunks", list)
    if len(chunks) != chunk_count(size, chunk_size):
        raise ManifestError(f"{path}: {len(chunks)} chunk hashes for {size} bytes")
    return FileEntry(
        path, size, check_digest(raw.get("sha256")), tuple(check_digest(c) for c in chunks)
    )


def parse_manifest(data: bytes | Mapping[str, Any]) -> Manifest:
    """Parse (without verifying the signature) bytes from any source, untrusted."""
    if isinstance(data, bytes | bytearray):
        if len(data) > MAX_MANIFEST_BYTES:
            raise ManifestError(f"manifest of {len(data)} bytes exceeds {MAX_MANIFEST_BYTES}")
        try:
            raw = json.loads(data)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ManifestError(f"manifest is not JSON: {exc}") from exc
        except RecursionError as exc:
            raise ManifestError("manifest JSON nests too deeply") from exc
    else:
        raw = dict(data)
    if not isinstance(raw, dict):
        raise ManifestError("manifest is not a JSON object")
    if raw.get("format") != FORMAT:
        raise ManifestError(f"unsupported manifest format {raw.get('format')!r}")
    try:
        model = ModelId(_require(raw, "name", str), _require(raw, "version", str))
    except ValueError as exc:
        raise ManifestError(str(exc)) from exc
    chunk_size = _require(raw, "chunk_size", int)
    if not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE:
        raise ManifestError(f"chunk_size {chunk_size} outside [{MIN_CHUNK_SIZE}, {MAX_CHUNK_SIZE}]")
    files_raw = _require(raw, "files", list)
    if not 0 < len(files_raw) <= MAX_FILES:
        raise ManifestError(f"manifest lists {len(files_raw)} files")
    files = tuple(_parse_file(f, chunk_size) for f in files_raw)
    paths = [f.path for f in files]
    if len(set(paths)) != len(paths):
        raise ManifestError("duplicate file path in manifest")
    as_dirs = {str(parent) for p in paths for parent in PurePosixPath(p).parents}
    if as_dirs & set(paths):
        raise ManifestError("a file path is also used as a directory")
    tags = _require(raw, "tags", list)
    if not all(isinstance(t, str) for t in tags):
        raise ManifestError("tags must be strings")
    return Manifest(
        model=model,
        category=_require(raw, "category", str),
        tags=tuple(tags),
        license=_require(raw, "license", str),
        arch=_require(raw, "arch", dict),
        chunk_size=chunk_size,
        files=files,
        publisher=_require(raw, "publisher", str),
        signature=_require(raw, "signature", str),
        raw=raw,
    )


def load_verified(data: bytes, trust: TrustStore, expect: ModelId | None = None) -> Manifest:
    """Parse, check it is the model asked for (any version for ``@latest``), verify."""
    manifest = parse_manifest(data)
    if expect is not None:
        if manifest.model.name != expect.name or (
            expect.version != "latest" and manifest.model.version != expect.version
        ):
            raise ManifestError(f"asked for {expect}, got a manifest for {manifest.model}")
    manifest.verify(trust)
    return manifest


def hash_file(path: Path, chunk_size: int) -> FileEntry:
    whole = hashlib.sha256()
    chunks: list[str] = []
    size = 0
    with open(path, "rb") as handle:
        while piece := handle.read(chunk_size):
            whole.update(piece)
            chunks.append(hashlib.sha256(piece).hexdigest())
            size += len(piece)
    if not chunks:
        chunks.append(hashlib.sha256(b"").hexdigest())
    return FileEntry("", size, whole.hexdigest(), tuple(chunks))


def scan_model_dir(directory: Path, chunk_size: int = DEFAULT_CHUNK_SIZE) -> list[FileEntry]:
    """Hash every regular file under ``directory``; symlinks are refused, not followed."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ManifestError(f"{directory} is not a directory")
    entries: list[FileEntry] = []
    for path in sorted(directory.rglob("*")):
        if path.is_symlink():
            raise ManifestError(f"refusing symlink {path} in a model directory")
        if path.is_dir():
            continue
        if not path.is_file():
            raise ManifestError(f"refusing non-regular file {path}")
        rel = check_relative_path(path.relative_to(directory).as_posix())
        entry = hash_file(path, chunk_size)
        entries.append(FileEntry(rel, entry.size, entry.sha256, entry.chunks))
    if not entries:
        raise ManifestError(f"{directory} holds no files")
    return entries


def sign_manifest(unsigned: Mapping[str, Any], key: Ed25519PrivateKey) -> Manifest:
    body = {k: v for k, v in unsigned.items() if k != "signature"}
    body["publisher"] = public_key_hex(key)
    body["signature"] = key.sign(canonical_json(body)).hex()
    return parse_manifest(body)


def build_manifest(
    directory: Path,
    model: ModelId,
    category: str,
    key: Ed25519PrivateKey,
    *,
    tags: Iterable[str] = (),
    license: str = "unknown",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    files: list[FileEntry] | None = None,
) -> Manifest:
    """Hash ``directory`` (unless ``files`` is given) and sign the manifest."""
    entries = files if files is not None else scan_model_dir(directory, chunk_size)
    arch: dict[str, Any] = {}
    arch_path = Path(directory) / ARCH_FILE
    if arch_path.is_file():
        loaded = json.loads(arch_path.read_text())
        if isinstance(loaded, dict):
            arch = loaded
    body = {
        "format": FORMAT,
        "name": model.name,
        "version": model.version,
        "category": category,
        "tags": sorted(set(tags)),
        "license": license if license != "unknown" else str(arch.get("license", "unknown")),
        "arch": arch,
        "chunk_size": chunk_size,
        "created": int(time.time()),
        "files": [e.to_dict() for e in entries],
    }
    return sign_manifest(body, key)
