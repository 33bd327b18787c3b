"""Shared output for benchmarks: a machine line and a section in docs/benchmarks.md."""

from __future__ import annotations

import datetime
import os
import platform
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

DOC = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"


def machine() -> str:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (
        f"{datetime.date.today().isoformat()} on {platform.machine()} "
        f"({platform.processor() or 'unknown cpu'}), {os.cpu_count()} cores, "
        f"Python {platform.python_version()}, load average {load:.1f} at the end"
    )


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def write_section(name: str, body: str, doc: Path = DOC) -> None:
    """Replace (or append) the ``<!-- bench:name -->`` section of docs/benchmarks.md."""
    begin, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    text = doc.read_text() if doc.exists() else "# Benchmarks\n"
    block = f"{begin}\n{body.strip()}\n{end}"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        _, tail = rest.split(end, 1)
        text = head + block + tail
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(text)


@dataclass(frozen=True)
class Ratio:
    """The one ratio every benchmark reports: the median of paired per-round ratios, with
    the smallest and largest of them (pairing rounds cancels the machine's drift)."""

    median: float
    low: float
    high: float

    def __str__(self) -> str:
        return f"{self.median:.2f} ({self.low:.2f}-{self.high:.2f})"


def paired_ratio(numerators: Sequence[float], denominators: Sequence[float]) -> Ratio:
    ratios = [a / b if b else 0.0 for a, b in zip(numerators, denominators, strict=True)]
    return Ratio(statistics.median(ratios), min(ratios), max(ratios))


RATIO_DEFINITION = (
    "Every ratio is the median of paired per-round ratios (each round measures both "
    "sides, in alternating order), with the smallest and largest per-round ratio beside it."
)


def ratio_cell(ratio: Ratio, digits: int = 2, unit: str = "x") -> str:
    """A table cell: ``0.92x (0.85-0.97)``, median then the min-max spread of the rounds."""
    return f"{ratio.median:.{digits}f}{unit} ({ratio.low:.{digits}f}-{ratio.high:.{digits}f}{unit})"


def ratio_fields(key: str, ratio: Ratio, digits: int = 2) -> dict[str, str]:
    """Headline pairs for one ratio: ``key``, ``key_min`` and ``key_max``, in that order."""
    return {
        key: f"{ratio.median:.{digits}f}",
        f"{key}_min": f"{ratio.low:.{digits}f}",
        f"{key}_max": f"{ratio.high:.{digits}f}",
    }


def headline(fields: dict[str, str]) -> str:
    """The last line a benchmark prints: ``key=value`` pairs separated by spaces."""
    return " ".join(f"{key}={value}" for key, value in fields.items())


def turns(sides: Sequence[T], round_index: int) -> list[T]:
    """The order ``sides`` run in round ``round_index``: rotated by one each round, so
    every side goes first as often as the others and drift within a round cancels."""
    k = round_index % len(sides)
    return [*sides[k:], *sides[:k]]
