"""Predictive pre-load: warm the model the next request will probably need.

After each request the predictor's distribution over the next category becomes a
probability per *model* (specialists share models). The preloader keeps the likeliest
models warm within the cache's slot count: it loads the best missing one into a free
slot, or unloads the idle model with the lowest predicted probability to make room.
A model in use or pinned is never a victim (and the cache refuses to unload one in use
anyway), so a pre-load can cost a wasted load but never a running request.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import trio

from p2pedge.errors import Busy, ModelLoadError, ModelNotCached
from p2pedge.orchestrator.catalog import Catalog, model_matches
from p2pedge.orchestrator.interfaces import LoadedLike, LocalInferenceLike
from p2pedge.orchestrator.predictor import NextCategoryPredictor


@dataclass(frozen=True)
class PreloadStep:
    """Load ``load``, first unloading ``evict`` (None when a slot is free)."""

    load: str
    evict: str | None
    probability: float


def model_probabilities(catalog: Catalog, distribution: Mapping[str, float]) -> dict[str, float]:
    out: dict[str, float] = {}
    for category, p in distribution.items():
        try:
            model = catalog.for_category(category).model
        except KeyError:
            continue
        out[model] = out.get(model, 0.0) + p
    return out


def plan_step(
    probs: Mapping[str, float],
    loaded: Sequence[LoadedLike],
    *,
    max_models: int,
    min_probability: float,
) -> PreloadStep | None:
    """The next warm-up worth doing, or None. Pure, so the policy is testable."""

    def loaded_row(model: str) -> LoadedLike | None:
        return next((r for r in loaded if model_matches(model, r.name)), None)

    def prob_of(row: LoadedLike) -> float:
        return max((p for m, p in probs.items() if model_matches(m, row.name)), default=0.0)

    wanted = sorted(
        ((m, p) for m, p in probs.items() if p >= min_probability), key=lambda mp: (-mp[1], mp[0])
    )[:max_models]
    for model, p in wanted:
        if loaded_row(model) is not None:
            continue
        if len(loaded) < max_models:
            return PreloadStep(model, None, p)
        idle = [r for r in loaded if not r.in_use and not r.pinned and prob_of(r) < p]
        if not idle:
            return None
        victim = min(idle, key=lambda r: (prob_of(r), r.name))
        return PreloadStep(model, victim.name, p)
    return None


@dataclass
class PreloadStats:
    """What the preloader did, and what became of its warm-ups.

    ``used``: pre-loaded models a request then ran on (the warm-up paid off);
    ``wasted``: pre-loaded models that left the cache before any request ran on them.
    A warm-up still resident and unused is neither yet (:meth:`Preloader.settle`).
    """

    warmed: list[str] = field(default_factory=list)
    evicted: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    used: list[str] = field(default_factory=list)
    wasted: list[str] = field(default_factory=list)


class Preloader:
    """Runs :func:`plan_step` in the background after each request."""

    def __init__(
        self,
        local: LocalInferenceLike,
        catalog: Catalog,
        predictor: NextCategoryPredictor,
        *,
        max_models: int,
        min_probability: float = 0.15,
        max_steps: int = 2,
    ) -> None:
        self.local = local
        self.catalog = catalog
        self.predictor = predictor
        self.max_models = max_models
        self.min_probability = min_probability
        self.max_steps = max_steps
        self.stats = PreloadStats()
        # warmed model -> the cache's use count right after the warm-up
        self._pending: dict[str, int] = {}
        self._running = False
        self._again = False
        self.idle = trio.Event()
        self.idle.set()

    def schedule(self, nursery: trio.Nursery) -> None:
        """Start a background pass, or ask the running one to go again."""
        if self._running:
            self._again = True
            return
        self._running = True
        self.idle = trio.Event()
        nursery.start_soon(self._loop)

    async def _loop(self) -> None:
        try:
            while True:
                self._again = False
                await self.run_once()
                if not self._again:
                    return
        finally:
            self._running = False
            self.idle.set()

    def settle(self) -> None:
        """Sort earlier warm-ups into used / wasted from the cache's use counts.

        Runs at the start of every pass (so after every request); call it once more
        at the end of a replay to count the last ones.
        """
        rows = self.local.loaded()
        for model, uses_after_warm in list(self._pending.items()):
            row = next((r for r in rows if model_matches(model, r.name)), None)
            if row is None:
                self.stats.wasted.append(model)
            elif _uses(row) > uses_after_warm:
                self.stats.used.append(model)
            else:
                continue
            del self._pending[model]

    async def run_once(self) -> list[PreloadStep]:
        """Do up to ``max_steps`` warm-ups for the current prediction."""
        self.settle()
        done: list[PreloadStep] = []
        for _ in range(self.max_steps):
            probs = model_probabilities(self.catalog, self.predictor.distribution())
            step = plan_step(
                probs,
                self.local.loaded(),
                max_models=self.max_models,
                min_probability=self.min_probability,
            )
            if step is None:
                break
            try:
                if step.evict is not None:
                    await self.local.unload(step.evict)
                    self.stats.evicted.append(step.evict)
                await self.local.warm(step.load)
            except (Busy, ModelLoadError, ModelNotCached):
                self.stats.refused.append(step.load)
                break
            self.stats.warmed.append(step.load)
            row = next((r for r in self.local.loaded() if model_matches(step.load, r.name)), None)
            if row is not None:
                self._pending[step.load] = _uses(row)
            done.append(step)
        return done


def _uses(row: LoadedLike) -> int:
    """The cache's use count of a row (0 for rows that do not keep one)."""
    uses = getattr(row, "uses", 0)
    return uses if isinstance(uses, int) else 0
