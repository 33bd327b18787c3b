"""Catalog parsing and the decayed Markov predictor."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import pytest

from p2pedge.errors import ConfigError
from p2pedge.orchestrator.catalog import Catalog, model_matches
from p2pedge.orchestrator.predictor import NextCategoryPredictor
from p2pedge.orchestrator.trace import (
    CATEGORIES,
    END,
    MAX_TURNS,
    THINK_MIN_S,
    WORKFLOWS,
    generate_trace,
    load_trace,
    save_trace,
)
from p2pedge.records.card import CachedModel


@dataclass
class Card:
    peer_id: str
    models: list[object] = field(default_factory=list)


def test_default_catalog_shares_one_model() -> None:
    catalog = Catalog.load()
    assert catalog.categories == ["chat", "explain-code", "math", "summarize", "translate"]
    assert catalog.models() == ["smollm2-135m-instruct"]
    spec = catalog.for_category("summarize")
    messages = spec.messages("some long text")
    assert messages[0]["role"] == "system"
    assert messages[-1]["content"].endswith("some long text")


def test_catalog_finds_peers_from_cards() -> None:
    catalog = Catalog.load()
    cards = [
        Card("a", [CachedModel("smollm2-135m-instruct@q4", "d" * 64)]),
        Card("b", [{"id": "other@1", "digest": "x"}]),
        Card("c", [{"id": "smollm2-135m-instruct@latest", "digest": "y"}]),
        Card("d", [{"id": "Not A Valid Id!", "digest": "z"}]),
    ]
    assert catalog.peers_offering(catalog.resolve("chat"), cards) == ["a", "c"]


@pytest.mark.parametrize(
    "text",
    [
        "not toml [",
        "[[specialist]]\nname = 'x'\ncategory = 'y'\n",
        "[[specialist]]\nname='x'\ncategory='y'\nmodel='m'\ntemplate='no placeholder'\n",
        "[[specialist]]\nname='x'\ncategory='y'\nmodel='m'\ntemperature=9.0\n",
        "[[specialist]]\nname='x'\ncategory='y'\nmodel='Bad Name'\n",
    ],
)
def test_bad_catalogs_are_config_errors(text: str) -> None:
    with pytest.raises(ConfigError):
        Catalog.from_toml(text)


def test_model_matching_rules() -> None:
    assert model_matches("m", "m@1")
    assert model_matches("m@1", "m@1")
    assert not model_matches("m@1", "m@2")
    assert not model_matches("m", "n@1")


def test_predictor_learns_transitions_and_forgets() -> None:
    p = NextCategoryPredictor(decay=0.9)
    assert p.predict() == []
    for _ in range(10):
        p.observe("summarize")
        p.observe("translate")
    assert p.predict("summarize")[0][0] == "translate"
    assert p.predict("translate")[0][0] == "summarize"
    for _ in range(30):
        p.observe("math")
    assert p.predict("math")[0][0] == "math"
    assert p.distribution("math")["math"] > 0.85
    assert abs(sum(p.distribution().values()) - 1.0) < 1e-9


def test_blend_beats_recency_and_the_chain_alone_for_a_cache_of_two() -> None:
    """Top-2 predictions are what a 2-slot pre-loader keeps warm; LRU-2 is what a plain
    recency cache keeps. On a long generated trace the blend beats both."""
    events = generate_trace(seed=3, sessions=200)
    blended, chain = NextCategoryPredictor(), NextCategoryPredictor(recency_weight=0.0)
    hits = {"blend": 0, "chain": 0, "lru": 0}
    lru: list[str] = []
    for prev, event in itertools.pairwise(events):
        lru = [prev.category, *(c for c in lru if c != prev.category)][:2]
        hits["lru"] += event.category in lru
        for name, p in (("blend", blended), ("chain", chain)):
            p.observe(prev.category)
            hits[name] += event.category in [c for c, _ in p.predict(k=2)]
    assert hits["blend"] > hits["lru"] and hits["blend"] > hits["chain"], hits


def test_weights_are_checked() -> None:
    with pytest.raises(ValueError):
        NextCategoryPredictor(markov_weight=0.8, recency_weight=0.3)


def test_session_start_breaks_the_chain() -> None:
    p = NextCategoryPredictor()
    p.observe("chat")
    p.observe("math", session_start=True)
    assert "chat" not in p.transitions or not p.transitions["chat"].get("math")


def test_predictor_beats_frequency_on_generated_trace() -> None:
    events = generate_trace(seed=3, sessions=60)
    markov = NextCategoryPredictor()
    freq = NextCategoryPredictor(markov_weight=0.0, recency_weight=0.0)
    hits = {"markov": 0, "freq": 0}
    for prev, event in itertools.pairwise(events):
        for name, p in (("markov", markov), ("freq", freq)):
            p.observe(prev.category)
            if p.predict(k=1) and p.predict(k=1)[0][0] == event.category:
                hits[name] += 1
    assert hits["markov"] > hits["freq"]


def test_trace_is_seeded_and_replayable(tmp_path) -> None:  # type: ignore[no-untyped-def]
    a, b = generate_trace(seed=7, sessions=5), generate_trace(seed=7, sessions=5)
    assert a == b and a != generate_trace(seed=8, sessions=5)
    assert all(x.t <= y.t for x, y in itertools.pairwise(a))
    save_trace(a, tmp_path / "t.jsonl")
    assert load_trace(tmp_path / "t.jsonl") == a


def test_workflows_are_proper_chains() -> None:
    assert abs(sum(w.share for w in WORKFLOWS) - 1.0) < 1e-9
    for flow in WORKFLOWS:
        assert abs(sum(flow.start.values()) - 1.0) < 1e-9
        for state, row in flow.steps.items():
            assert state in CATEGORIES and abs(sum(row.values()) - 1.0) < 1e-9, flow.name
            # every category a workflow can reach has its own row
            assert all(nxt == END or nxt in flow.steps for nxt in row), flow.name
        assert set(flow.start) <= set(flow.steps)


def test_trace_sessions_follow_their_workflow_with_think_times() -> None:
    events = generate_trace(seed=11, sessions=80)
    by_name = {w.name: w for w in WORKFLOWS}
    assert {e.workflow for e in events} == set(by_name)
    for prev, event in itertools.pairwise(events):
        if event.session == prev.session:
            assert event.turn == prev.turn + 1 and event.workflow == prev.workflow
            assert by_name[event.workflow].steps[prev.category][event.category] > 0
            assert event.think_s >= THINK_MIN_S
            assert event.t == prev.t + event.think_s
        else:
            assert event.turn == 0 and event.session == prev.session + 1
            assert by_name[event.workflow].start[event.category] > 0
    assert max(e.turn for e in events) < MAX_TURNS
    # workflows chain specialists: a good share of hand-offs change category
    pairs = [(a, b) for a, b in itertools.pairwise(events) if a.session == b.session]
    same = [a.category == b.category for a, b in pairs]
    assert 0.25 < sum(same) / len(same) < 0.6
