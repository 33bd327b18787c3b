"""A bounded pre-scan of a GGUF header, run before the ``gguf`` library parses a file.

The library loops over each array's claimed length even past the end of the file (one
corrupted count hung it for over five minutes) and spends tens of microseconds per
metadata item. :func:`scan_header` walks the header once, pure and linear in its size,
checking every count and length against :class:`GGUFLimits` and against the bytes left,
and raises a :class:`GGUFFormatError` naming the key or tensor at fault.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf

from p2pedge.errors import ModelLoadError


class GGUFFormatError(ModelLoadError):
    """A GGUF file is truncated, corrupt or not a supported Llama model."""

    def __init__(self, message: str, tensor: str | None = None, *, key: str | None = None):
        where = f"tensor {tensor!r}: " if tensor else f"metadata key {key!r}: " if key else ""
        super().__init__(where + message)
        self.reason = message
        self.tensor = tensor
        self.key = key


@dataclass(frozen=True)
class GGUFLimits:
    """Bounds on a GGUF header, checked before the ``gguf`` library parses it.

    Generous for real models (Llama 3's tokens, merges and types are about 540k array items)
    while bounding the library's per-item Python loop, which costs tens of microseconds an
    item: ``max_items`` keeps even a maximal header to well under a minute of parsing.
    """

    max_kv: int = 4096
    max_tensors: int = 65536
    max_key_bytes: int = 1024
    max_string_bytes: int = 1 << 20  # chat templates are the longest strings in practice
    max_array_len: int = 1 << 19  # Llama 3 has 280k merges, Gemma 262k tokens
    max_items: int = 1 << 20  # array items of all keys together
    max_name_bytes: int = 256  # tensor names
    max_dims: int = 4
    max_elements: int = 1 << 40  # per tensor


DEFAULT_LIMITS = GGUFLimits()
SUPPORTED_VERSIONS = (2, 3)
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q"}
_SCALARS[12] = "d"
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class GGUFHeader:
    """What :func:`scan_header` learnt: enough to trust the library with the rest."""

    version: int
    byte_order: str  # "<" or ">"
    keys: tuple[str, ...]
    tensors: tuple[str, ...]
    info_end: int  # where tensor infos end (data starts after alignment padding)


class _Cursor:
    """Bounds-checked reads over the header bytes; errors name what was being read."""

    def __init__(self, data: bytes | memoryview | mmap.mmap, order: str) -> None:
        self.data = data
        self.size = len(data)
        self.pos = 0
        self.order = order

    def number(self, fmt: str, what: str, key: str | None = None) -> Any:
        width = struct.calcsize(fmt)
        if self.pos + width > self.size:
            raise GGUFFormatError(f"file ends inside {what} at byte {self.pos}", key=key)
        (value,) = struct.unpack_from(self.order + fmt, self.data, self.pos)
        self.pos += width
        return value

    def skip(self, nbytes: int, what: str, key: str | None = None) -> None:
        if nbytes > self.size - self.pos:
            raise GGUFFormatError(
                f"{what} of {nbytes} bytes runs past the end of the file", key=key
            )
        self.pos += nbytes

    def text(self, limit: int, what: str, key: str | None = None) -> str:
        length = self.number("Q", f"{what} length", key)
        if length > limit:
            raise GGUFFormatError(f"{what} of {length} bytes exceeds {limit}", key=key)
        start = self.pos
        self.skip(length, what, key)
        try:
            return bytes(self.data[start : self.pos]).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise GGUFFormatError(f"{what} is not UTF-8", key=key) from exc


def _scan_value(cur: _Cursor, kind: int, key: str, limits: GGUFLimits, items: list[int]) -> None:
    if kind in _SCALARS:
        cur.skip(struct.calcsize(_SCALARS[kind]), "value", key)
    elif kind == _STRING:
        length = cur.number("Q", "string length", key)
        if length > limits.max_string_bytes:
            raise GGUFFormatError(
                f"string of {length} bytes exceeds {limits.max_string_bytes}", key=key
            )
        cur.skip(length, "string", key)
    elif kind == _ARRAY:
        item = cur.number("I", "array item type", key)
        count = cur.number("Q", "array length", key)
        if count > limits.max_array_len:
            raise GGUFFormatError(f"array of {count} items exceeds {limits.max_array_len}", key=key)
        items[0] += count
        if items[0] > limits.max_items:
            raise GGUFFormatError(f"arrays hold over {limits.max_items} items in all", key=key)
        if item in _SCALARS:
            cur.skip(count * struct.calcsize(_SCALARS[item]), "array", key)
        elif item == _STRING:
            for _ in range(count):
                _scan_value(cur, _STRING, key, limits, items)
        else:
            raise GGUFFormatError(f"arrays of type {item} are not supported", key=key)
    else:
        raise GGUFFormatError(f"unknown value type {kind}", key=key)


def scan_header(
    data: bytes | memoryview | mmap.mmap, limits: GGUFLimits = GGUFLimits()
) -> GGUFHeader:
    """Walk a GGUF header under ``limits``; a :class:`GGUFFormatError` names what broke.

    Pure and linear in the header's size: every count is checked against its limit and
    against the bytes left before anything is looped over.
    """
    if len(data) < 8 or bytes(data[:4]) != b"GGUF":
        raise GGUFFormatError("not a GGUF file (bad magic)")
    order = ">" if struct.unpack_from("<I", data, 4)[0] & 0xFFFF == 0 else "<"
    cur = _Cursor(data, order)
    cur.pos = 4
    version = cur.number("I", "version")
    if version not in SUPPORTED_VERSIONS:
        raise GGUFFormatError(f"GGUF version {version} is not supported")
    n_tensors = cur.number("Q", "tensor count")
    n_kv = cur.number("Q", "metadata count")
    if n_tensors > limits.max_tensors:
        raise GGUFFormatError(f"{n_tensors} tensors exceed {limits.max_tensors}")
    if n_kv > limits.max_kv:
        raise GGUFFormatError(f"{n_kv} metadata keys exceed {limits.max_kv}")
    keys: list[str] = []
    items = [0]
    for index in range(n_kv):
        key = cur.text(limits.max_key_bytes, f"key #{index}")
        if key in keys:
            raise GGUFFormatError("appears twice", key=key)
        keys.append(key)
        _scan_value(cur, cur.number("I", "value type", key), key, limits, items)
    names: list[str] = []
    seen: set[str] = set()
    for index in range(n_tensors):
        name = cur.text(limits.max_name_bytes, f"name of tensor #{index}")
        if name in seen:
            raise GGUFFormatError("appears twice", name)
        seen.add(name)
        names.append(name)
        n_dims = cur.number("I", "dimension count", None)
        if not 1 <= n_dims <= limits.max_dims:
            raise GGUFFormatError(f"{n_dims} dimensions (1 to {limits.max_dims})", name)
        elements = 1
        for _ in range(n_dims):
            dim = cur.number("Q", "dimension")
            if dim < 1:
                raise GGUFFormatError("has an empty dimension", name)
            elements *= dim
            if elements > limits.max_elements:
                raise GGUFFormatError(f"over {limits.max_elements} elements", name)
        kind = cur.number("I", "tensor type")
        try:
            gguf.GGMLQuantizationType(kind)
        except ValueError as exc:
            raise GGUFFormatError(f"unknown tensor type {kind}", name) from exc
        offset = cur.number("Q", "tensor offset")
        if offset > cur.size:
            raise GGUFFormatError(f"data offset {offset} is past the end (truncated?)", name)
    return GGUFHeader(version, order, tuple(keys), tuple(names), cur.pos)


def scan_file(path: Path, limits: GGUFLimits = GGUFLimits()) -> GGUFHeader:
    """:func:`scan_header` over a file, through a read-only memory map."""
    try:
        with open(path, "rb") as handle:
            if handle.seek(0, 2) < 8:
                raise GGUFFormatError(f"{path} is too short to be a GGUF file")
            with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
                return scan_header(data, limits)
    except GGUFFormatError as exc:
        reason = f"{path} is not a readable GGUF file: {exc.reason}"
        raise GGUFFormatError(reason, exc.tensor, key=exc.key) from exc
    except OSError as exc:
        raise GGUFFormatError(f"cannot read {path}: {exc}") from exc
