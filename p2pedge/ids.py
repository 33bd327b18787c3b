"""Frozen identifiers shared across layers. Stdlib only."""

from __future__ import annotations

import re
from dataclasses import dataclass

_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
_VERSION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,31}$")


@dataclass(frozen=True, order=True)
class ModelId:
    """``name@version``; names are lowercase so lookups never depend on case."""

    name: str
    version: str = "latest"

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise ValueError(f"invalid model name {self.name!r}")
        if not _VERSION.match(self.version):
            raise ValueError(f"invalid model version {self.version!r}")

    @classmethod
    def parse(cls, text: str) -> ModelId:
        name, _, version = text.partition("@")
        return cls(name, version or "latest")

    def __str__(self) -> str:
        return f"{self.name}@{self.version}"


@dataclass(frozen=True, order=True)
class LayerRange:
    """Half-open block range ``[start, end)`` of a transformer."""

    start: int
    end: int

    def __post_init__(self) -> None:
        if not (0 <= self.start < self.end):
            raise ValueError(f"invalid layer range [{self.start}, {self.end})")

    @classmethod
    def parse(cls, text: str) -> LayerRange:
        start, sep, end = text.partition("-")
        if not sep:
            raise ValueError(f"layer range must be START-END, got {text!r}")
        return cls(int(start), int(end))

    def __len__(self) -> int:
        return self.end - self.start

    def __contains__(self, block: object) -> bool:
        return isinstance(block, int) and self.start <= block < self.end

    def __str__(self) -> str:
        return f"{self.start}-{self.end}"
