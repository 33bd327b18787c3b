"""ModelCache: 2-10 warm models within a measured memory budget. Thread-safe, no trio.

* each model's cost is measured at load (RSS growth, wall time), never guessed;
* loads are serialised (one ``_load_lock``) so RSS growth is attributable to one model,
  and concurrent requests for the same cold model wait for a single load;
* a leased model is never evicted; eviction follows ``policy.choose_victims``;
* a failed load leaves the cache exactly as it was: victims are only chosen after the
  new model loaded, so the budget may be exceeded by one model for the length of a load.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from p2pedge.errors import Busy, ModelLoadError
from p2pedge.runtime.config import RuntimeConfig
from p2pedge.runtime.loader import LoadedModel, LoadReport, measured_load
from p2pedge.runtime.memory import default_budget
from p2pedge.runtime.policy import EntryStats, choose_victims, keep_score

Loader = Callable[[Path, RuntimeConfig], LoadReport]


@dataclass(frozen=True)
class CachedModel:
    """A row of ``ModelCache.loaded()``."""

    name: str
    path: Path
    kind: str
    provider: str
    size_bytes: int
    load_s: float
    uses: int
    idle_s: float
    pinned: bool
    in_use: int
    score: float


def cache_key(path: Path | str) -> str:
    """Models are keyed by their resolved directory, so aliases share one load."""
    return str(Path(path).resolve())


@dataclass
class _Entry:
    name: str
    path: Path
    model: LoadedModel
    size_bytes: int
    load_s: float
    uses: int
    last_used: float
    leases: int = 0

    def stats(self, pinned: bool) -> EntryStats:
        return EntryStats(
            self.size_bytes, self.load_s, self.uses, self.last_used, pinned, self.leases > 0
        )


class _Ticket(threading.Event):
    """A load in progress; waiters re-raise the loader's error instead of retrying."""

    error: BaseException | None = None


class Lease:
    """Use of a warm model; while held the model cannot be evicted or unloaded."""

    def __init__(self, cache: ModelCache, key: str, model: LoadedModel) -> None:
        self._cache = cache
        self.key = key
        self.model = model
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._cache._release(self.key)

    def __enter__(self) -> Lease:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


class ModelCache:
    def __init__(
        self,
        config: RuntimeConfig,
        *,
        loader: Loader = measured_load,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.max_models = config.max_models
        self.budget_bytes = config.memory_budget_bytes or default_budget(config.memory_share)
        self._loader = loader
        self._clock = clock
        self._lock = threading.Lock()
        self._load_lock = threading.Lock()
        self._entries: dict[str, _Entry] = {}
        self._pinned: set[str] = set()
        self._loading: dict[str, _Ticket] = {}
        self.loads = 0  # completed loads, for stats and tests
        self.evictions = 0

    # -- loading -----------------------------------------------------------------------

    def ensure_loaded(self, path: Path, name: str | None = None) -> None:
        """Block until the model at ``path`` is warm; one load per directory at a time.

        ``name`` is only for display in ``loaded()`` and messages.

        Raises ModelLoadError (cache unchanged) or Busy when every slot is held by
        pinned or in-use models.
        """
        key = cache_key(path)
        while True:
            with self._lock:
                if key in self._entries:
                    return
                event = self._loading.get(key)
                owner = event is None
                if event is None:
                    event = self._loading[key] = _Ticket()
            if owner:
                self._load(key, name or Path(path).name, event)
                return
            event.wait()
            if event.error is not None:
                raise event.error

    def _load(self, key: str, name: str, event: _Ticket) -> None:
        closing: list[LoadedModel] = []
        try:
            with self._lock:
                if self._victims(extra_count=1, extra_bytes=0) is None:
                    raise Busy(self._full_message(name))
            with self._load_lock:
                report = self._loader(Path(key), self.config)
            with self._lock:
                if report.rss_bytes > self.budget_bytes:
                    closing.append(report.model)
                    raise ModelLoadError(
                        f"{name} needs {report.rss_bytes} bytes, "
                        f"more than the cache budget of {self.budget_bytes}"
                    )
                victims = self._victims(extra_count=1, extra_bytes=report.rss_bytes)
                if victims is None:
                    closing.append(report.model)
                    raise Busy(self._full_message(name))
                for victim in victims:
                    closing.append(self._entries.pop(victim).model)
                    self.evictions += 1
                now = self._clock()
                self._entries[key] = _Entry(
                    name, Path(key), report.model, report.rss_bytes, report.load_s, 0, now
                )
                self.loads += 1
        except BaseException as exc:
            event.error = exc
            raise
        finally:
            with self._lock:
                del self._loading[key]
            event.set()
            for model in closing:
                model.close()

    def _victims(self, *, extra_count: int, extra_bytes: int) -> list[str] | None:
        stats = {k: e.stats(k in self._pinned) for k, e in self._entries.items()}
        return choose_victims(
            stats,
            max_models=self.max_models,
            budget_bytes=self.budget_bytes,
            now=self._clock(),
            extra_count=extra_count,
            extra_bytes=extra_bytes,
            half_life_s=self.config.cache_half_life_s,
        )

    def _full_message(self, name: str) -> str:
        held = sorted(e.name for k, e in self._entries.items() if k in self._pinned or e.leases)
        return (
            f"cannot load {name}: the model cache is full ({len(self._entries)}/"
            f"{self.max_models} models, budget {self.budget_bytes} bytes) and every "
            f"resident model is pinned or in use ({', '.join(held) or 'none'}); retry later"
        )

    # -- leases ------------------------------------------------------------------------

    def try_acquire(self, path: Path) -> Lease | None:
        """A lease on the model at ``path`` if it is warm, else None (never blocks)."""
        key = cache_key(path)
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            entry.leases += 1
            entry.uses += 1
            entry.last_used = self._clock()
            return Lease(self, key, entry.model)

    def acquire(self, path: Path, name: str | None = None) -> Lease:
        """Load if needed and lease the model (blocking; for threads and scripts)."""
        while True:
            lease = self.try_acquire(path)
            if lease is not None:
                return lease
            self.ensure_loaded(path, name)

    def _release(self, key: str) -> None:
        with self._lock:
            entry = self._entries[key]
            entry.leases -= 1
            entry.last_used = self._clock()

    # -- management --------------------------------------------------------------------

    def pin(self, path: Path) -> None:
        """Never evict this model (applies whenever it is loaded, now or later)."""
        with self._lock:
            self._pinned.add(cache_key(path))

    def unpin(self, path: Path) -> None:
        with self._lock:
            self._pinned.discard(cache_key(path))

    def unload(self, path: Path) -> bool:
        """Drop the model now; False if it was not loaded, Busy if it is in use."""
        key = cache_key(path)
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return False
            if entry.leases:
                raise Busy(f"cannot unload {entry.name}: {entry.leases} request(s) are using it")
            del self._entries[key]
        entry.model.close()
        return True

    def is_loaded(self, path: Path) -> bool:
        with self._lock:
            return cache_key(path) in self._entries

    def loaded(self) -> list[CachedModel]:
        """Warm models with their measured size and usage, most valuable first."""
        now = self._clock()
        with self._lock:
            rows = [
                CachedModel(
                    name=e.name,
                    path=e.path,
                    kind=e.model.kind,
                    provider=e.model.provider,
                    size_bytes=e.size_bytes,
                    load_s=e.load_s,
                    uses=e.uses,
                    idle_s=max(0.0, now - e.last_used),
                    pinned=k in self._pinned,
                    in_use=e.leases,
                    score=keep_score(
                        e.stats(k in self._pinned), now, self.config.cache_half_life_s
                    ),
                )
                for k, e in self._entries.items()
            ]
        return sorted(rows, key=lambda r: -r.score)

    def used_bytes(self) -> int:
        with self._lock:
            return sum(e.size_bytes for e in self._entries.values())

    def close(self) -> None:
        """Unload everything not in use (for shutdown)."""
        with self._lock:
            idle = [k for k, e in self._entries.items() if not e.leases]
            models = [self._entries.pop(k).model for k in idle]
        for model in models:
            model.close()

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {
                "models": len(self._entries),
                "max_models": self.max_models,
                "used_bytes": sum(e.size_bytes for e in self._entries.values()),
                "budget_bytes": self.budget_bytes,
                "loads": self.loads,
                "evictions": self.evictions,
            }
