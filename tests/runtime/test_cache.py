"""ModelCache with real tiny models: warm set, eviction, single loads, leases."""

from __future__ import annotations

import threading
from dataclasses import replace
from pathlib import Path

import pytest

from p2pedge.errors import Busy, ModelLoadError
from p2pedge.runtime.cache import ModelCache
from p2pedge.runtime.config import RuntimeConfig
from p2pedge.runtime.loader import LoadReport, measured_load

CONFIG = RuntimeConfig(intra_op_threads=1, max_models=2, memory_budget_bytes=8 << 30)


class FakeClock:
    """Monotonic time we move by hand, so recency is deterministic."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class CountingLoader:
    """The real measured loader, counting calls (and optionally gated)."""

    def __init__(self, gate: threading.Event | None = None) -> None:
        self.calls = 0
        self.gate = gate
        self.started = threading.Event()

    def __call__(self, path: Path, config: RuntimeConfig) -> LoadReport:
        self.calls += 1
        self.started.set()
        if self.gate is not None:
            assert self.gate.wait(30)
        return measured_load(path, config)


def names(cache: ModelCache) -> set[str]:
    return {m.name for m in cache.loaded()}


def test_two_warm_and_a_third_evicts_the_lowest_score(tiny_dirs: dict[str, Path]) -> None:
    clock = FakeClock()
    cache = ModelCache(CONFIG, clock=clock)
    cache.ensure_loaded(tiny_dirs["tiny-a"], "a")
    cache.ensure_loaded(tiny_dirs["tiny-b"], "b")
    for _ in range(5):  # a is used often and recently; b sits idle for an hour
        cache.acquire(tiny_dirs["tiny-a"]).release()
    clock.now += 3600
    cache.acquire(tiny_dirs["tiny-a"]).release()
    rows = {m.name: m for m in cache.loaded()}
    assert rows["a"].score > rows["b"].score
    assert all(m.size_bytes >= 0 and m.load_s > 0 for m in rows.values())
    cache.ensure_loaded(tiny_dirs["tiny-c"], "c")
    assert names(cache) == {"a", "c"}
    assert cache.evictions == 1


def test_eviction_follows_the_policy_not_recency_alone(tiny_dirs: dict[str, Path]) -> None:
    clock = FakeClock()
    cache = ModelCache(CONFIG, clock=clock, loader=ModeledCost(size=1 << 20, load_s=0.5))
    cache.ensure_loaded(tiny_dirs["tiny-a"], "a")
    cache.ensure_loaded(tiny_dirs["tiny-b"], "b")
    for _ in range(30):
        cache.acquire(tiny_dirs["tiny-a"]).release()
    clock.now += 10
    cache.acquire(tiny_dirs["tiny-b"]).release()  # b is the most recently used
    rows = cache.loaded()
    assert min(rows, key=lambda r: r.score).name == "b"  # frequency outweighs 10 s idle
    cache.ensure_loaded(tiny_dirs["tiny-c"], "c")
    assert names(cache) == {"a", "c"}


@pytest.mark.parametrize(("half_life_s", "evicted"), [(5.0, "a"), (600.0, "b")])
def test_half_life_sets_how_fast_frequency_fades(
    tiny_dirs: dict[str, Path], half_life_s: float, evicted: str
) -> None:
    clock = FakeClock()
    config = replace(CONFIG, cache_half_life_s=half_life_s)
    cache = ModelCache(config, clock=clock, loader=ModeledCost(size=1 << 20, load_s=0.5))
    cache.ensure_loaded(tiny_dirs["tiny-a"], "a")
    cache.ensure_loaded(tiny_dirs["tiny-b"], "b")
    for _ in range(30):
        cache.acquire(tiny_dirs["tiny-a"]).release()
    clock.now += 60  # a was busy a minute ago; b is used now
    cache.acquire(tiny_dirs["tiny-b"]).release()
    cache.ensure_loaded(tiny_dirs["tiny-c"], "c")
    assert names(cache) == {"a", "b", "c"} - {evicted}


def test_concurrent_cold_requests_load_once(tiny_dirs: dict[str, Path]) -> None:
    gate = threading.Event()
    loader = CountingLoader(gate)
    cache = ModelCache(CONFIG, loader=loader)
    leases = []
    errors: list[BaseException] = []

    def get() -> None:
        try:
            leases.append(cache.acquire(tiny_dirs["tiny-a"], "a"))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=get) for _ in range(4)]
    for t in threads:
        t.start()
    assert loader.started.wait(30)
    gate.set()
    for t in threads:
        t.join(30)
    assert not errors
    assert loader.calls == 1 and cache.loads == 1
    assert len({id(lease.model) for lease in leases}) == 1
    assert cache.loaded()[0].in_use == 4
    for lease in leases:
        lease.release()
    assert cache.loaded()[0].in_use == 0


def test_a_model_in_use_is_never_evicted(tiny_dirs: dict[str, Path]) -> None:
    clock = FakeClock()
    cache = ModelCache(CONFIG, clock=clock)
    held = cache.acquire(tiny_dirs["tiny-a"], "a")  # lowest score: old and used once
    clock.now += 3600
    for _ in range(10):
        cache.acquire(tiny_dirs["tiny-b"], "b").release()
    cache.ensure_loaded(tiny_dirs["tiny-c"], "c")
    assert names(cache) == {"a", "c"}
    held_b = cache.acquire(tiny_dirs["tiny-c"])
    with pytest.raises(Busy, match="pinned or in use"):
        cache.ensure_loaded(tiny_dirs["tiny-b"], "b")
    assert names(cache) == {"a", "c"}
    with pytest.raises(Busy):
        cache.unload(tiny_dirs["tiny-a"])
    held.release()
    held_b.release()
    assert cache.unload(tiny_dirs["tiny-a"]) is True
    assert cache.unload(tiny_dirs["tiny-a"]) is False


def test_pinned_model_survives_and_unpin_releases_it(tiny_dirs: dict[str, Path]) -> None:
    clock = FakeClock()
    cache = ModelCache(CONFIG, clock=clock)
    cache.pin(tiny_dirs["tiny-a"])
    cache.ensure_loaded(tiny_dirs["tiny-a"], "a")
    clock.now += 3600
    cache.acquire(tiny_dirs["tiny-b"], "b").release()
    cache.ensure_loaded(tiny_dirs["tiny-c"], "c")
    assert names(cache) == {"a", "c"}
    cache.unpin(tiny_dirs["tiny-a"])
    clock.now += 3600
    cache.acquire(tiny_dirs["tiny-c"]).release()
    cache.ensure_loaded(tiny_dirs["tiny-b"], "b")
    assert names(cache) == {"b", "c"}


def test_failed_load_leaves_cache_unchanged(tiny_dirs: dict[str, Path], broken_dir: Path) -> None:
    cache = ModelCache(CONFIG)
    cache.ensure_loaded(tiny_dirs["tiny-a"], "a")
    cache.ensure_loaded(tiny_dirs["tiny-b"], "b")
    before = [(m.name, m.uses) for m in cache.loaded()]
    with pytest.raises(ModelLoadError):
        cache.ensure_loaded(broken_dir, "broken")
    assert [(m.name, m.uses) for m in cache.loaded()] == before
    assert cache.evictions == 0


class ModeledCost:
    """Fault injection: a real load whose measured cost is replaced by fixed figures,
    so that budget arithmetic does not depend on allocator noise."""

    def __init__(self, size: int, load_s: float = 0.1) -> None:
        self.size = size
        self.load_s = load_s

    def __call__(self, path: Path, config: RuntimeConfig) -> LoadReport:
        return replace(measured_load(path, config), rss_bytes=self.size, load_s=self.load_s)


def test_model_larger_than_the_budget_is_refused(tiny_dirs: dict[str, Path]) -> None:
    cache = ModelCache(CONFIG, loader=ModeledCost(1 << 40))
    with pytest.raises(ModelLoadError, match="budget"):
        cache.ensure_loaded(tiny_dirs["tiny-a"], "a")
    assert cache.loaded() == []


def test_memory_budget_evicts_by_measured_size(tiny_dirs: dict[str, Path]) -> None:
    cfg = replace(CONFIG, max_models=10, memory_budget_bytes=250 << 20)
    cache = ModelCache(cfg, loader=ModeledCost(100 << 20))
    cache.ensure_loaded(tiny_dirs["tiny-a"], "a")
    cache.ensure_loaded(tiny_dirs["tiny-b"], "b")
    assert names(cache) == {"a", "b"}
    cache.acquire(tiny_dirs["tiny-b"]).release()
    cache.ensure_loaded(tiny_dirs["tiny-c"], "c")  # 300 MiB > 250 MiB: one must go
    assert names(cache) == {"b", "c"}
    assert cache.used_bytes() == 200 << 20


def test_first_load_is_measured(tiny_dirs: dict[str, Path]) -> None:
    cache = ModelCache(CONFIG)
    cache.ensure_loaded(tiny_dirs["tiny-a"], "a")
    row = cache.loaded()[0]
    assert row.load_s > 0 and row.size_bytes >= 0
    assert row.provider == "CPUExecutionProvider" and row.kind == "decoder"


@pytest.mark.real_model
def test_real_model_rss_growth_is_measured() -> None:
    from p2pedge.testing import real_model_dir

    cache = ModelCache(CONFIG)
    cache.ensure_loaded(real_model_dir(), "smollm2")
    row = cache.loaded()[0]
    # 146 MB of weights on disk: the measured growth must be of that order, not a guess.
    assert 50 << 20 < row.size_bytes < 2 << 30
