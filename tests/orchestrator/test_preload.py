"""Predictive pre-load: the policy (pure) and real warm-ups in a real ModelCache."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import trio

from p2pedge.node.inference import LocalInference
from p2pedge.orchestrator.catalog import Catalog
from p2pedge.orchestrator.orchestrator import Orchestrator
from p2pedge.orchestrator.predictor import NextCategoryPredictor
from p2pedge.orchestrator.preload import Preloader, ThinkTimes, choose_victim, plan_step

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


# -- timing: think-time aware steps, passes that stop for a request, room on a miss -----


def slow_only(load_s: float, elapsed_s: float) -> float:
    """Arrival risk where only loads longer than 0.3 s are likely to be caught."""
    return 0.6 if load_s > 0.3 else 0.05


def test_plan_skips_a_load_the_next_request_would_likely_wait_for() -> None:
    rows = [Row("a@latest"), Row("c@latest")]
    probs = {"a": 0.5, "b": 0.3, "c": 0.1}
    kw = {"max_models": 2, "min_probability": 0.05}
    assert plan_step(probs, rows, **kw, load_s={"b": 0.5}, risk=slow_only) is None
    quick = plan_step(probs, rows, **kw, load_s={"b": 0.1}, risk=slow_only)
    assert quick is not None and (quick.load, quick.evict) == ("b", "c@latest")
    # a load time never measured is not gated
    unknown = plan_step(probs, rows, **kw, load_s={}, risk=slow_only)
    assert unknown is not None and unknown.load == "b"


def test_plan_falls_back_to_a_quicker_less_likely_candidate() -> None:
    rows = [Row("a@latest"), Row("c@latest"), Row("e@latest")]
    probs = {"b": 0.35, "a": 0.3, "d": 0.3, "c": 0.02, "e": 0.01}
    step = plan_step(
        probs, rows, max_models=3, min_probability=0.05, load_s={"b": 0.5, "d": 0.1},
        risk=slow_only,
    )  # fmt: skip
    assert step is not None and (step.load, step.evict) == ("d", "e@latest")


def test_arrival_risk_is_read_from_recent_think_times() -> None:
    think = ThinkTimes(window=5)
    for t in (0.1, 0.2, 0.3, 0.4):
        think.add(t)
    assert think.arrival_risk(0.15, 0.0) == 0.0  # too few pauses known yet
    think.add(1.0)
    assert think.arrival_risk(0.15, 0.0) == pytest.approx(1 / 5)
    # a load starting 0.25 s after the answer: only pauses longer than that count
    assert think.arrival_risk(0.15, 0.25) == pytest.approx(1 / 3)
    think.add(2.0)  # the window drops the oldest pause (0.1)
    assert list(think.samples) == [0.2, 0.3, 0.4, 1.0, 2.0]
    assert think.arrival_risk(0.15, 0.0) == 0.0


def test_miss_victim_is_the_least_likely_idle_model() -> None:
    probs = {"a": 0.6, "c": 0.1, "d": 0.05}
    assert choose_victim(probs, [Row("a@latest"), Row("c@latest")]) == "c@latest"
    busy = [Row("a@latest"), Row("c@latest", in_use=1), Row("d@latest", pinned=True)]
    assert choose_victim(probs, busy) == "a@latest"
    assert choose_victim(probs, [Row("c@latest", in_use=1)]) is None


def test_distribution_after_a_category_counts_it_as_the_latest() -> None:
    p = NextCategoryPredictor(markov_weight=0.0, recency_weight=1.0)
    for category in ("summarize", "math", "chat"):
        p.observe(category)
    assert p.distribution() == pytest.approx({"summarize": 0.0, "math": 0.4, "chat": 0.6})
    after = p.distribution("summarize")
    assert after == pytest.approx({"summarize": 0.6, "math": 0.0, "chat": 0.4})


@dataclass
class FakeRow:
    name: str
    load_s: float = 0.1
    in_use: int = 0
    pinned: bool = False
    uses: int = 1


class GatedLocal:
    """A LocalInferenceLike whose loads wait for the test to let them finish."""

    def __init__(self, load_s: float = 0.1) -> None:
        self.rows: list[FakeRow] = []
        self.load_s = load_s
        self.loading = trio.Event()
        self.release = trio.Event()

    async def resolve(self, model: str) -> tuple[object, object]:
        raise NotImplementedError

    async def complete(self, model: str, **kw: object) -> object:
        raise NotImplementedError

    async def warm(self, model: str) -> None:
        self.loading.set()
        await self.release.wait()
        self.rows.append(FakeRow(f"{model}@latest", self.load_s))

    async def unload(self, model: str) -> bool:
        self.rows = [r for r in self.rows if r.name != model]
        return True

    def loaded(self) -> list[FakeRow]:
        return self.rows


def chat_then_translate_or_math(catalog: Catalog) -> NextCategoryPredictor:
    """After chat: translate (tiny-b) or math (tiny-c); chat itself (tiny-a) unlikely."""
    predictor = NextCategoryPredictor(recency_weight=0.0)
    for nxt in ("translate", "math") * 4:
        predictor.observe("chat", session_start=True)
        predictor.observe(nxt)
    predictor.observe("chat", session_start=True)
    top = {catalog.for_category(c).model for c, _ in predictor.predict(k=2)}
    assert top == {"tiny-b", "tiny-c"}
    return predictor


async def test_a_pass_stops_before_its_next_step_when_a_request_comes_in(
    catalog: Catalog,
) -> None:
    local = GatedLocal()
    preloader = Preloader(local, catalog, chat_then_translate_or_math(catalog), max_models=2)
    async with trio.open_nursery() as nursery:
        done: list[list[str]] = []

        async def one_pass() -> None:
            done.append([s.load for s in await preloader.run_once()])

        nursery.start_soon(one_pass)
        await local.loading.wait()
        preloader.request_started()  # arrives while the first warm-up is loading
        local.release.set()
    assert len(done[0]) == 1 and len(local.rows) == 1
    assert preloader.stats.stopped == 1 and preloader.stats.overlapped == 1
    preloader.request_finished()
    assert len(await preloader.run_once()) == 1
    assert {r.name for r in local.rows} == {"tiny-b@latest", "tiny-c@latest"}


async def test_preloader_skips_a_slow_load_when_the_user_is_quick(catalog: Catalog) -> None:
    local = GatedLocal()
    local.release.set()
    preloader = Preloader(local, catalog, chat_then_translate_or_math(catalog), max_models=2)
    preloader.load_s.update({"tiny-b": 2.0, "tiny-c": 2.0})  # measured earlier
    for _ in range(10):
        preloader.think.add(0.5)  # the next request always came within half a second
    assert await preloader.run_once() == []
    assert local.rows == [] and preloader.stats.skipped == 1
    for _ in range(64):
        preloader.think.add(30.0)  # now the user reads for half a minute
    assert len(await preloader.run_once()) == 2


async def test_a_miss_unloads_the_least_likely_model_and_keeps_the_predicted_one(
    make_local: MakeLocal, catalog: Catalog
) -> None:
    local = make_local(max_models=2)
    predictor = NextCategoryPredictor()
    for _ in range(5):
        predictor.observe("translate")
        predictor.observe("chat")  # translate -> chat (tiny-a); math (tiny-c) never follows
    predictor.observe("math", session_start=True)
    async with trio.open_nursery() as nursery:
        orch = Orchestrator(local, None, catalog=catalog, predictor=predictor, nursery=nursery)
        assert orch.preloader is not None
        for model in ("tiny-a", "tiny-c"):
            await local.warm(model)
        answer = await orch.ask("Translate 'cat' into French.", category="translate")
        assert not answer.was_warm and answer.decision.model == "tiny-b"
        assert orch.preloader.stats.made_room == ["tiny-c@latest"]
        assert names(local) >= {"tiny-a@latest", "tiny-b@latest"}
        await orch.preloader.idle.wait()


async def test_make_room_never_unloads_a_model_in_use(
    make_local: MakeLocal, catalog: Catalog
) -> None:
    local = make_local(max_models=2)
    preloader = Preloader(local, catalog, translate_next(), max_models=2)
    for model in ("tiny-a", "tiny-c"):
        await local.warm(model)
    leases = [local.cache.try_acquire((await local.resolve(m))[1]) for m in ("tiny-a", "tiny-c")]
    try:
        assert await preloader.make_room("tiny-b", "translate") is None
        assert names(local) == {"tiny-a@latest", "tiny-c@latest"}
    finally:
        for lease in leases:
            assert lease is not None
            lease.release()
    assert await preloader.make_room("tiny-b", "translate") == "tiny-c@latest"
    assert names(local) == {"tiny-a@latest"}
