"""Process memory as psutil measures it: what a model costs is RSS growth at load."""

from __future__ import annotations

import psutil

_PROC = psutil.Process()


def rss_bytes() -> int:
    """Resident set size of this process right now."""
    return int(_PROC.memory_info().rss)


def available_bytes() -> int:
    """RAM the OS could give us without swapping."""
    return int(psutil.virtual_memory().available)


def default_budget(share: float) -> int:
    """``share`` of currently available RAM: the default cache budget."""
    return int(available_bytes() * share)
