"""Predictive pre-load: the policy (pure) and real warm-ups in a real ModelCache."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import trio

from p2pedge.node.inference import LocalInference
from p2pedge.orchestrator.catalog import Catalog
from p2pedge.orchestrator.orchestrator import Orchestrator
from p2pedge.orchestrator.predictor import NextCategoryPredictor
from p2pedge.orchestrator.preload import Preloader, plan_step

MakeLocal = Callable[..., LocalInference]


@dataclass
class Row:
    name: str
    in_use: int = 0
    pinned: bool = False
    load_s: float = 0.1


def test_plan_uses_a_free_slot_first() -> None:
    step = plan_step({"a": 0.7, "b": 0.3}, [Row("a@latest")], max_models=2, min_probability=0.1)
    assert step is not None and (step.load, step.evict) == ("b", None)


def test_plan_evicts_the_least_likely_idle_model() -> None:
    rows = [Row("a@latest"), Row("c@latest")]
    step = plan_step({"a": 0.5, "b": 0.4, "c": 0.1}, rows, max_models=2, min_probability=0.05)
    assert step is not None and (step.load, step.evict) == ("b", "c@latest")


def test_plan_never_evicts_in_use_or_pinned() -> None:
    rows = [Row("a@latest", in_use=1), Row("c@latest", pinned=True)]
    assert plan_step({"b": 0.9, "a": 0.05}, rows, max_models=2, min_probability=0.1) is None


def test_plan_ignores_unlikely_models() -> None:
    assert plan_step({"b": 0.05}, [], max_models=2, min_probability=0.1) is None


def names(local: LocalInference) -> set[str]:
    return {row.name for row in local.loaded()}


async def test_preload_warms_the_predicted_model_in_background(
    make_local: MakeLocal, catalog: Catalog
) -> None:
    local = make_local()
    predictor = NextCategoryPredictor()
    for _ in range(5):
        predictor.observe("chat")
        predictor.observe("translate")
    async with trio.open_nursery() as nursery:
        orch = Orchestrator(local, None, catalog=catalog, predictor=predictor, nursery=nursery)
        assert orch.preloader is not None
        answer = await orch.ask("hello", category="chat")
        assert answer.decision.model == "tiny-a"
        await orch.preloader.idle.wait()
        assert "tiny-b@latest" in names(local), orch.preloader.stats
        assert orch.preloader.stats.warmed[0] == "tiny-b"
        follow = await orch.ask("Translate 'cat' into French.")
        assert follow.decision.model == "tiny-b" and follow.was_warm


async def test_preload_never_evicts_a_model_in_use(make_local: MakeLocal, catalog: Catalog) -> None:
    local = make_local(max_models=2)
    await local.warm("tiny-a")
    await local.warm("tiny-c")
    predictor = NextCategoryPredictor()
    for _ in range(6):
        predictor.observe("math")
        predictor.observe("translate")
    predictor.observe("math")  # next: translate (tiny-b); tiny-c is also likely, tiny-a not
    preloader = Preloader(local, catalog, predictor, max_models=2, min_probability=0.05)
    leases = [local.cache.try_acquire((await local.resolve(m))[1]) for m in ("tiny-a", "tiny-c")]
    try:
        # tiny-b is the likeliest, but both resident models are in use: nothing may go
        assert [row.in_use for row in local.loaded()] == [1, 1]
        steps = await preloader.run_once()
        assert names(local) == {"tiny-a@latest", "tiny-c@latest"}
        assert steps == [] and preloader.stats.evicted == []
    finally:
        for lease in leases:
            assert lease is not None
            lease.release()
    steps = await preloader.run_once()
    assert [s.load for s in steps] == ["tiny-b"] and steps[0].evict == "tiny-a@latest"
    assert names(local) == {"tiny-b@latest", "tiny-c@latest"}


def translate_next() -> NextCategoryPredictor:
    predictor = NextCategoryPredictor()
    for _ in range(5):
        predictor.observe("chat")
        predictor.observe("translate")
    predictor.observe("chat")  # next: translate (tiny-b), likely chat (tiny-a)
    return predictor


async def test_a_preload_a_request_then_runs_on_counts_as_used(
    make_local: MakeLocal, catalog: Catalog
) -> None:
    local = make_local(max_models=2)
    preloader = Preloader(local, catalog, translate_next(), max_models=2, max_steps=1)
    steps = await preloader.run_once()
    assert [s.load for s in steps] == ["tiny-b"] and "tiny-b@latest" in names(local)
    preloader.settle()
    assert preloader.stats.used == [] and preloader.stats.wasted == []  # not used yet
    await local.complete("tiny-b", prompt="bonjour", max_tokens=2)
    preloader.settle()
    assert preloader.stats.used == ["tiny-b"] and preloader.stats.wasted == []


async def test_a_preload_evicted_before_any_use_counts_as_wasted(
    make_local: MakeLocal, catalog: Catalog
) -> None:
    local = make_local(max_models=2)
    preloader = Preloader(local, catalog, translate_next(), max_models=2, max_steps=1)
    await preloader.run_once()
    assert "tiny-b@latest" in names(local)
    # the user asked for something else; tiny-b left the cache unused
    await local.complete("tiny-a", prompt="hi", max_tokens=2)
    assert await local.unload("tiny-b")
    preloader.settle()
    assert preloader.stats.wasted == ["tiny-b"] and preloader.stats.used == []
