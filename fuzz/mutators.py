"""Seeded input generation: byte-level mutations plus msgpack and JSON structure edits.

Byte mutations (bit flips, interesting bytes and integers, truncation, duplication,
splices with other samples, length-field edits) find framing and bounds bugs; structure
mutations decode a sample, change one value somewhere in it (type confusion, extreme
numbers, huge or deeply nested containers, dropped or extra keys) and encode it again, so
the decoder gets past parsing into its field validation. Same seed, same inputs.
"""

from __future__ import annotations

import json
import math
import random
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgpack

INTERESTING_INTS = (
    0, 1, -1, 2, 7, 8, 16, 31, 32, 63, 64, 127, 128, 255, 256, 1023, 1024, 4096, 65535,
    65536, 1 << 20, (1 << 31) - 1, 1 << 31, (1 << 32) - 1, 1 << 32, (1 << 53) + 1,
    (1 << 63) - 1, -(1 << 63), (1 << 64) - 1, -(1 << 31),
)  # fmt: skip
INTERESTING_FLOATS = (0.0, -0.0, 1e-45, 0.5, 1.0, 2.0, 1e38, 3.5e38, 1e308, -1e308)
NASTY_FLOATS = (math.nan, math.inf, -math.inf)


def _any_value(rng: random.Random, depth: int = 0) -> Any:
    """A random value of a random type: what a confused or hostile peer may put anywhere."""
    choice = rng.randrange(16 if depth < 3 else 11)
    if choice == 0:
        return None
    if choice == 1:
        return rng.random() < 0.5
    if choice in (2, 3):
        return rng.choice(INTERESTING_INTS)
    if choice == 4:
        return rng.choice(INTERESTING_FLOATS + NASTY_FLOATS)
    if choice == 5:
        return rng.choice(["", "latest", "../x", "\x00", "é" * rng.randrange(1, 40), "a" * 65])
    if choice == 6:
        return "x" * rng.choice([1, 64, 65, 129, 1025, 5000])
    if choice == 7:
        if rng.random() < 0.2:  # bytes that a JSON or msgpack parser will nest in deeply
            return rng.choice([b"[", b'{"a":', b"\x91", b"\x81\xa1a"]) * rng.choice([600, 50_000])
        return rng.randbytes(rng.choice([0, 1, 15, 16, 17, 31, 32, 33, 64]))
    if choice == 8:  # base58-looking, or more digits than int() will convert
        return rng.choice("19") * rng.choice([rng.randrange(1, 60), 5000])
    if choice == 9:
        return rng.randrange(-(1 << 64), 1 << 64)
    if choice == 10:
        return rng.uniform(-1e6, 1e6)
    if choice == 11:
        return [_any_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    if choice == 12:
        return {
            str(_any_value(rng, 3)): _any_value(rng, depth + 1) for _ in range(rng.randrange(4))
        }
    if choice == 13:
        return [0] * rng.choice([100, 5000])
    if choice == 14:
        value: Any = 0
        for _ in range(rng.choice([10, 100, 600])):
            value = [value]
        return value
    return {_any_value(rng, 3) if rng.random() < 0.3 else "k": 1}  # non-str keys


def _paths(obj: Any, prefix: tuple[Any, ...] = (), limit: int = 200) -> list[tuple[Any, ...]]:
    """Paths to nodes of ``obj`` (at most about ``limit`` of them, depth-first)."""
    out = [prefix]
    if len(prefix) > 20:
        return out
    if isinstance(obj, dict):
        for key, value in obj.items():
            out += _paths(value, (*prefix, key), limit - len(out))
            if len(out) >= limit:
                break
    elif isinstance(obj, list):
        for index, value in enumerate(obj[:limit]):
            out += _paths(value, (*prefix, index), limit - len(out))
            if len(out) >= limit:
                break
    return out


def _get(obj: Any, path: tuple[Any, ...]) -> Any:
    for step in path:
        obj = obj[step]
    return obj


def _tweak_number(rng: random.Random, value: int | float) -> int | float:
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return rng.choice([value + 1, value - 1, -value, value * 2, value << 32, ~value, 0])
    rounded = float(int(value)) if math.isfinite(value) else 0.0
    return rng.choice([value * 2, -value, value + 1e-7, *NASTY_FLOATS, rounded])


def mutate_tree(rng: random.Random, tree: Any) -> Any:
    """Change one node of a decoded message (in place where possible; returns the root)."""
    paths = _paths(tree)
    path = rng.choice(paths)
    node = _get(tree, path)
    action = rng.randrange(7)
    if action == 0 and isinstance(node, int | float):
        new: Any = _tweak_number(rng, node)
    elif action == 1 and isinstance(node, dict) and node:
        key = rng.choice(list(node))
        del node[key]
        return tree
    elif action == 2 and isinstance(node, dict):
        node[rng.choice(["t", "x", "extra", "op", "v", "", str(rng.randrange(99))])] = _any_value(
            rng
        )
        return tree
    elif action == 3 and isinstance(node, list) and node:
        new = node * rng.choice([2, 17]) if rng.random() < 0.5 else node[: rng.randrange(len(node))]
    elif action == 4 and isinstance(node, str | bytes) and node:
        cut = rng.randrange(len(node))
        text: Any = node
        new = text[:cut] + text[cut + 1 :] if rng.random() < 0.5 else text + text[:1] * 40
    else:
        new = _any_value(rng)
    if not path:
        return new
    _get(tree, path[:-1])[path[-1]] = new
    return tree


def _pack(obj: Any) -> bytes | None:
    try:
        data: bytes = msgpack.packb(obj, use_bin_type=True)
    except (TypeError, ValueError, OverflowError):
        return None  # e.g. an int outside 64 bits: msgpack cannot carry it anyway
    return data


def _json(obj: Any) -> bytes | None:
    try:
        return json.dumps(obj).encode()
    except (TypeError, ValueError, RecursionError):
        return None


def _flip_bits(rng: random.Random, data: bytearray) -> None:
    for _ in range(rng.choice([1, 1, 2, 4, 8])):
        pos = rng.randrange(len(data))
        data[pos] ^= 1 << rng.randrange(8)


def _set_int(rng: random.Random, data: bytearray) -> None:
    """Overwrite a length-sized field with an interesting integer, either byte order."""
    width, fmt = rng.choice([(1, "B"), (2, "H"), (4, "I"), (8, "Q")])
    if len(data) < width:
        return
    value = rng.choice(INTERESTING_INTS) % (1 << (8 * width))
    pos = rng.randrange(len(data) - width + 1)
    if rng.random() < 0.5:
        pos -= pos % width  # aligned, like most binary headers
    struct.pack_into(rng.choice("<>") + fmt, data, pos, value)


def mutate_bytes(rng: random.Random, sample: bytes, others: Sequence[bytes]) -> bytes:
    """One to four byte-level edits of ``sample``."""
    data = bytearray(sample or b"\0")
    for _ in range(rng.choice([1, 1, 2, 4])):
        action = rng.randrange(9)
        if not data:
            data = bytearray(b"\0")
        if action == 0:
            _flip_bits(rng, data)
        elif action == 1:
            data[rng.randrange(len(data))] = rng.choice([0, 0xFF, 0x7F, 0x80, 0xC1, 0xDC, 0xDD])
        elif action == 2:
            _set_int(rng, data)
        elif action == 3:
            del data[rng.randrange(len(data)) :]  # truncate
        elif action == 4:
            start = rng.randrange(len(data))
            end = min(len(data), start + rng.randrange(1, 64))
            data[start:start] = data[start:end] * rng.choice([1, 2, 16])
        elif action == 5:
            other = rng.choice(others) if others else bytes(data)
            cut, cut2 = rng.randrange(len(data) + 1), rng.randrange(len(other) + 1)
            data = data[:cut] + bytearray(other[cut2:])  # splice
        elif action == 6:
            pos = rng.randrange(len(data) + 1)
            data[pos:pos] = rng.randbytes(rng.randrange(1, 9))
        elif action == 7:
            start = rng.randrange(len(data))
            del data[start : start + rng.randrange(1, 16)]
        else:
            data = bytearray(rng.randbytes(rng.randrange(0, 64)))  # plain noise
    return bytes(data)


@dataclass(frozen=True)
class Sample:
    """A known-good input: ``prefix`` (a target's sub-decoder tag, kept as is), then
    ``body`` of ``kind`` ``"msgpack"``, ``"json"`` or ``"raw"``, length-prefixed if
    ``framed``. Structure edits change the body and re-frame it, so they reach the field
    checks behind the framing. Hostile seeds (``good=False``) start mutation from inputs
    a byte mutator would rarely reach, such as a well-formed file with a mistyped field."""

    body: bytes
    kind: str = "raw"
    prefix: bytes = b""
    framed: bool = False
    good: bool = True  # False: a hostile seed, which the decoder must refuse

    def assemble(self, body: bytes) -> bytes:
        return self.prefix + (struct.pack(">I", len(body)) + body if self.framed else body)

    @property
    def data(self) -> bytes:
        return self.assemble(self.body)


class Mutator:
    """An endless, seeded stream of inputs made from ``samples``."""

    def __init__(self, seed: int, samples: Sequence[Sample]) -> None:
        if not samples:
            raise ValueError("a mutator needs at least one sample")
        self.rng = random.Random(seed)
        self.samples = list(samples)
        self.raw = [s.data for s in self.samples]

    def _structured(self, sample: Sample) -> bytes | None:
        if sample.kind == "msgpack":
            tree = msgpack.unpackb(sample.body, raw=False, strict_map_key=False)
        else:
            tree = json.loads(sample.body)
        for _ in range(self.rng.choice([1, 1, 2, 3])):
            tree = mutate_tree(self.rng, tree)
        body = _pack(tree) if sample.kind == "msgpack" else _json(tree)
        return None if body is None else sample.assemble(body)

    def __call__(self) -> bytes:
        index = self.rng.randrange(len(self.samples))
        sample = self.samples[index]
        roll = self.rng.random()
        if roll < 0.02:
            return self.raw[index]
        if roll < 0.55 and sample.kind in ("msgpack", "json"):
            data = self._structured(sample)
            if data is not None:
                if self.rng.random() < 0.15:
                    return mutate_bytes(self.rng, data, self.raw)
                return data
        if roll < 0.6 and sample.kind == "json":
            depth = self.rng.choice([100, 1000, 100_000])
            nested = b"[" * depth + (b"]" * depth if self.rng.random() < 0.5 else b"")
            return sample.assemble(nested)
        return mutate_bytes(self.rng, self.raw[index], self.raw)
