"""Process memory as psutil measures it: what a model costs is RSS growth at load."""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from collections.abc import Callable
from typing import cast

import psutil

_PROC = psutil.Process()


def _malloc_trim() -> Callable[[int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    name = ctypes.util.find_library("c")
    trim = getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None  # glibc only
    if trim is None:
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return cast(Callable[[int], int], trim)


_TRIM = _malloc_trim()


def rss_bytes() -> int:
    """Resident set size of this process right now."""
    return int(_PROC.memory_info().rss)


def release_free_heap() -> None:
    """Give the heap's free pages back to the OS (glibc ``malloc_trim``), so the RSS growth
    of the next load is that load's own: memory a model freed at unload stays resident,
    and a load reusing it measured 0 bytes (seen with SmolLM2 after earlier loads)."""
    if _TRIM is not None:
        _TRIM(0)


def available_bytes() -> int:
    """RAM the OS could give us without swapping."""
    return int(psutil.virtual_memory().available)


def default_budget(share: float) -> int:
    """``share`` of currently available RAM: the default cache budget."""
    return int(available_bytes() * share)
