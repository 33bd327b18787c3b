"""The eviction policy as a pure function: properties over random caches."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from p2pedge.runtime.policy import EntryStats, choose_victims, keep_score

NOW = 10_000.0

entry_st = st.builds(
    EntryStats,
    size_bytes=st.integers(0, 10**9),
    load_s=st.floats(0, 30),
    uses=st.integers(0, 1000),
    last_used=st.floats(0, NOW),
    pinned=st.booleans(),
    in_use=st.booleans(),
)
cache_st = st.dictionaries(st.text(min_size=1, max_size=4), entry_st, max_size=10)


def fits(
    kept: list[EntryStats], extra: int, extra_bytes: int, max_models: int, budget: int
) -> bool:
    return (
        len(kept) + extra <= max_models and sum(e.size_bytes for e in kept) + extra_bytes <= budget
    )


@given(
    cache_st,
    st.integers(2, 10),
    st.integers(0, 10**10),
    st.integers(0, 1),
    st.integers(0, 10**9),
)
def test_victims_fit_limits_and_spare_pinned_and_busy(
    entries: dict[str, EntryStats], max_models: int, budget: int, extra: int, extra_bytes: int
) -> None:
    victims = choose_victims(
        entries,
        max_models=max_models,
        budget_bytes=budget,
        now=NOW,
        extra_count=extra,
        extra_bytes=extra_bytes,
    )
    evictable = [k for k, e in entries.items() if e.evictable]
    if victims is None:
        # Even evicting every candidate would not fit.
        rest = [e for k, e in entries.items() if not e.evictable]
        assert (
            len(rest) + extra > max_models or sum(e.size_bytes for e in rest) + extra_bytes > budget
        )
        return
    assert set(victims) <= set(evictable)
    kept = [e for k, e in entries.items() if k not in victims]
    assert fits(kept, extra, extra_bytes, max_models, budget)
    # Victims are the lowest-scoring candidates, and none is taken needlessly.
    if victims:
        worst_kept = min(
            (keep_score(entries[k], NOW) for k in evictable if k not in victims), default=None
        )
        if worst_kept is not None:
            assert max(keep_score(entries[k], NOW) for k in victims) <= worst_kept
        shorter = victims[:-1]
        left = [e for k, e in entries.items() if k not in shorter]
        assert (
            len(left) + extra > max_models or sum(e.size_bytes for e in left) + extra_bytes > budget
        )


def test_score_prefers_costly_frequent_recent() -> None:
    base = EntryStats(size_bytes=1, load_s=1.0, uses=10, last_used=NOW)
    costly = EntryStats(size_bytes=1, load_s=5.0, uses=10, last_used=NOW)
    frequent = EntryStats(size_bytes=1, load_s=1.0, uses=100, last_used=NOW)
    stale = EntryStats(size_bytes=1, load_s=1.0, uses=10, last_used=NOW - 600)
    assert keep_score(costly, NOW) > keep_score(base, NOW)
    assert keep_score(frequent, NOW) > keep_score(base, NOW)
    assert keep_score(stale, NOW) < keep_score(base, NOW) / 3.9  # two half-lives


def test_not_plain_lru_a_costly_model_outlives_a_cheap_recent_one() -> None:
    entries = {
        "big": EntryStats(size_bytes=1, load_s=20.0, uses=5, last_used=NOW - 120),
        "cheap": EntryStats(size_bytes=1, load_s=0.05, uses=5, last_used=NOW - 1),
    }
    assert choose_victims(entries, max_models=2, budget_bytes=10, now=NOW, extra_count=1) == [
        "cheap"
    ]


def test_nothing_evicted_when_it_already_fits() -> None:
    entries = {"a": EntryStats(size_bytes=5, load_s=1, uses=1, last_used=0)}
    assert choose_victims(entries, max_models=2, budget_bytes=10, now=NOW, extra_count=1) == []
    assert choose_victims(entries, max_models=2, budget_bytes=10, now=NOW, extra_bytes=6) == ["a"]
