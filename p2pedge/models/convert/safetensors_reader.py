"""Read ``*.safetensors`` files (and sharded indexes) with numpy only, no torch.

The files may come from anywhere, so the header is checked before anything is allocated
from it: the 8-byte header length against :data:`MAX_HEADER_BYTES` and the file size, every
entry's dtype, shape and byte range (inside the data section, exactly ``prod(shape)`` items
long, no two overlapping), and the tensor count. A tensor is then read from its own byte
range only. Every failure is a :class:`SafetensorsError` naming the file and tensor.
"""

from __future__ import annotations

import itertools
import json
import math
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from p2pedge.errors import ModelLoadError

MAX_HEADER_BYTES = 100 << 20  # the safetensors library's own limit
MAX_TENSORS = 1 << 16
MAX_INDEX_BYTES = 16 << 20
MAX_DIMS = 8
DTYPES: dict[str, tuple[np.dtype[Any], int]] = {
    "F32": (np.dtype("<f4"), 4),
    "F16": (np.dtype("<f2"), 2),
    "BF16": (np.dtype("<u2"), 2),
}
_FILE = re.compile(r"^[A-Za-z0-9_.+-]{1,200}\.safetensors$")
INDEX_FILE = "model.safetensors.index.json"


class SafetensorsError(ModelLoadError):
    """A safetensors file or index is malformed; names the file and tensor at fault."""

    def __init__(self, message: str, path: Path, tensor: str | None = None) -> None:
        where = f"{path.name}: {tensor}" if tensor else path.name
        super().__init__(f"{where}: {message}")


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str  # F32, F16 or BF16
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int


def _entry(path: Path, name: str, raw: Any, data_start: int, file_size: int) -> TensorEntry:
    if not isinstance(raw, dict):
        raise SafetensorsError("entry is not an object", path, name)
    dtype: Any = raw.get("dtype")
    shape: Any = raw.get("shape")
    offsets: Any = raw.get("data_offsets")
    if dtype not in DTYPES:
        raise SafetensorsError(f"dtype {dtype!r} unsupported (only {sorted(DTYPES)})", path, name)
    dims_ok = isinstance(shape, list) and len(shape) <= MAX_DIMS
    if not dims_ok or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
        raise SafetensorsError("shape must be a list of at most 8 integers", path, name)
    if any(d < 0 for d in shape):
        raise SafetensorsError(f"negative dimension in {shape}", path, name)
    pair = isinstance(offsets, list) and len(offsets) == 2
    if not pair or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets):
        raise SafetensorsError("data_offsets must be two integers", path, name)
    begin, end = offsets
    if not 0 <= begin <= end or data_start + end > file_size:
        raise SafetensorsError(f"bytes [{begin}, {end}) outside the data section", path, name)
    if end - begin != math.prod(shape) * DTYPES[dtype][1]:
        raise SafetensorsError(f"{end - begin} bytes for shape {shape} of {dtype}", path, name)
    return TensorEntry(name, dtype, tuple(shape), data_start + begin, data_start + end)


def read_header(path: Path) -> dict[str, TensorEntry]:
    """The tensors of one file, every entry checked against the file (no data read)."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise SafetensorsError("shorter than its 8-byte header length", path)
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES or 8 + n > size:
                raise SafetensorsError(f"header of {n} bytes (file {size}, limit 100 MiB)", path)
            text = f.read(n)
    except OSError as exc:
        raise SafetensorsError(f"unreadable: {exc}", path) from exc
    try:
        header = json.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise SafetensorsError(f"header is not JSON: {exc}", path) from exc
    if not isinstance(header, dict) or len(header) > MAX_TENSORS:
        raise SafetensorsError("header must be an object of at most 65536 tensors", path)
    entries = {
        name: _entry(path, name, raw, 8 + n, size)
        for name, raw in header.items()
        if name != "__metadata__"
    }
    spans = sorted((e.start, e.end, e.name) for e in entries.values() if e.end > e.start)
    for (_, end_a, a), (start_b, _, b) in itertools.pairwise(spans):
        if start_b < end_a:
            raise SafetensorsError(f"overlaps {a}", path, b)
    return entries


def read_tensor(path: Path, entry: TensorEntry) -> npt.NDArray[np.float32]:
    """One tensor as float32 (BF16 widened exactly, F16 converted), finite-checked."""
    dtype, item = DTYPES[entry.dtype]
    count = (entry.end - entry.start) // item
    try:
        with path.open("rb") as f:
            f.seek(entry.start)
            data = f.read(entry.end - entry.start)  # bounded: checked against the file size
    except OSError as exc:
        raise SafetensorsError(f"unreadable: {exc}", path, entry.name) from exc
    if len(data) != count * item:
        raise SafetensorsError("truncated", path, entry.name)
    raw = np.frombuffer(data, dtype=dtype)
    values: npt.NDArray[np.float32]
    if entry.dtype == "BF16":
        values = (raw.astype(np.uint32) << 16).view(np.float32)
    else:
        values = raw.astype(np.float32)
    if not np.isfinite(values).all():
        raise SafetensorsError("contains NaN or infinity", path, entry.name)
    return values.reshape(entry.shape)


class SafetensorsDir:
    """Every tensor of a Hugging Face directory: one ``model.safetensors``, or the shards
    a ``model.safetensors.index.json`` names (plain file names in the directory only)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        index = directory / INDEX_FILE
        if index.is_file():
            files = self._index_files(index)
        else:
            files = sorted(p.name for p in directory.glob("*.safetensors"))
            if not files:
                raise SafetensorsError("no *.safetensors file", directory)
        self.entries: dict[str, tuple[Path, TensorEntry]] = {}
        for name in files:
            path = directory / name
            for tensor, entry in read_header(path).items():
                if tensor in self.entries:
                    raise SafetensorsError("in two files", path, tensor)
                self.entries[tensor] = (path, entry)

    def _index_files(self, index: Path) -> list[str]:
        try:
            if index.stat().st_size > MAX_INDEX_BYTES:
                raise SafetensorsError("index larger than 16 MiB", index)
            data = json.loads(index.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            raise SafetensorsError(f"unreadable index: {exc}", index) from exc
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict):
            raise SafetensorsError("index has no weight_map object", index)
        files = set()
        for tensor, file in weight_map.items():
            if not isinstance(file, str) or not _FILE.match(file) or file.startswith("."):
                raise SafetensorsError(f"shard {file!r} is not a plain file name", index, tensor)
            if not (self.directory / file).is_file():
                raise SafetensorsError(f"shard {file} is missing", index, tensor)
            files.add(file)
        return sorted(files)

    def has(self, name: str) -> bool:
        return name in self.entries

    def get(self, name: str, shape: tuple[int, ...]) -> npt.NDArray[np.float32]:
        found = self.entries.get(name)
        if found is None:
            raise SafetensorsError("missing", self.directory, name)
        path, entry = found
        if entry.shape != shape:
            raise SafetensorsError(f"shape {entry.shape}, expected {shape}", path, name)
        return read_tensor(path, entry)
