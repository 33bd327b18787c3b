"""Predictive pre-load: warm the model the next request will probably need.

After each answer the predictor's distribution over the next category becomes a
probability per *model* (specialists share models). The preloader keeps the likeliest
models warm within the cache's slot count: it loads the best missing one into a free
slot, or unloads the idle model with the lowest predicted probability to make room.
A model in use or pinned is never a victim (and the cache refuses to unload one in use
anyway), so a pre-load can cost a wasted load but never a running request.

Timing matters as much as the choice. A model load cannot be cancelled, and building an
onnxruntime-genai session holds the GIL for the whole load, so a request that arrives
during a warm-up waits for it even when its own model is warm. Hence:

* warm-ups run only between answers (in the user's think time): a pass stops before its
  next step as soon as a request comes in, and the next answer starts a fresh pass for
  the new prediction;
* a step is taken only if it pays: the chance that the next request finds its model
  warm *and* nothing loading must go up. Swapping the victim for the candidate raises
  the first by ``p(load) - p(evict)`` but risks the second: the request may come before
  the load is done, with a probability read from the user's own recent think times and
  the model's measured load time (a slow model is worth it only on clear evidence);
* on a cache miss the request's load would let the cache's cost-aware policy pick the
  victim; :meth:`Preloader.make_room` first unloads the resident model least likely to
  be needed after this request, so the model predicted next stays warm.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import trio

from p2pedge.errors import Busy, ModelLoadError, ModelNotCached
from p2pedge.orchestrator.catalog import Catalog, model_matches
from p2pedge.orchestrator.interfaces import LoadedLike, LocalInferenceLike
from p2pedge.orchestrator.predictor import NextCategoryPredictor

# (load_s, elapsed_s) -> probability that the next request arrives during that load
ArrivalRisk = Callable[[float, float], float]
MIN_THINK_SAMPLES = 5


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


def _prob_of(probs: Mapping[str, float], row: LoadedLike) -> float:
    return max((p for m, p in probs.items() if model_matches(m, row.name)), default=0.0)


def plan_step(
    probs: Mapping[str, float],
    loaded: Sequence[LoadedLike],
    *,
    max_models: int,
    min_probability: float,
    load_s: Mapping[str, float] | None = None,
    risk: ArrivalRisk | None = None,
    elapsed_s: float = 0.0,
) -> PreloadStep | None:
    """The next warm-up worth doing, or None. Pure, so the policy is testable.

    Candidates are the ``max_models`` likeliest models (at least ``min_probability``);
    the victim is the idle model with the lowest probability, below the candidate's.
    With ``load_s`` (measured load time by model) and ``risk``, a step must also pay:
    ``P(warm after) x (1 - risk(load_s(model), elapsed_s)) > P(warm now)``, where
    ``P(warm)`` sums the probabilities of the resident models; a candidate whose load
    time is unknown is not gated.
    """

    def loaded_row(model: str) -> LoadedLike | None:
        return next((r for r in loaded if model_matches(model, r.name)), None)

    def prob_of(row: LoadedLike) -> float:
        return _prob_of(probs, row)

    def cost_of(name: str) -> float | None:
        return next((s for m, s in (load_s or {}).items() if model_matches(m, name)), None)

    warm_now = sum(prob_of(r) for r in loaded)
    wanted = sorted(
        ((m, p) for m, p in probs.items() if p >= min_probability), key=lambda mp: (-mp[1], mp[0])
    )[:max_models]
    for model, p in wanted:
        if loaded_row(model) is not None:
            continue
        victim: LoadedLike | None = None
        if len(loaded) >= max_models:
            victim = _least_likely(probs, [r for r in loaded if prob_of(r) < p])
            if victim is None:
                return None
        cost = cost_of(model)
        if cost is not None and risk is not None:
            warm_after = warm_now + p - (prob_of(victim) if victim else 0.0)
            if warm_after * (1.0 - risk(cost, elapsed_s)) <= warm_now:
                continue  # a quicker, less likely candidate may still pay
        return PreloadStep(model, victim.name if victim else None, p)
    return None


def _least_likely(probs: Mapping[str, float], rows: Sequence[LoadedLike]) -> LoadedLike | None:
    """The idle (unleased, unpinned) row least likely to be asked next, ties by name."""
    idle = [r for r in rows if not r.in_use and not r.pinned]
    return min(idle, key=lambda r: (_prob_of(probs, r), r.name)) if idle else None


def choose_victim(probs: Mapping[str, float], loaded: Sequence[LoadedLike]) -> str | None:
    """The idle resident model least likely to be asked next (None if all are busy)."""
    victim = _least_likely(probs, loaded)
    return victim.name if victim is not None else None


@dataclass
class ThinkTimes:
    """Recent pauses between an answer and the next request: how long a warm-up has.

    ``arrival_risk(load_s, elapsed_s)``: the share of recorded pauses ending during a
    load that starts ``elapsed_s`` after the answer, among those longer than
    ``elapsed_s`` (a request that came earlier has already stopped the pass); 0 until
    :data:`MIN_THINK_SAMPLES` pauses are known.
    """

    window: int = 64
    samples: deque[float] = field(init=False)

    def __post_init__(self) -> None:
        self.samples = deque(maxlen=self.window)

    def add(self, seconds: float) -> None:
        self.samples.append(max(0.0, seconds))

    def arrival_risk(self, load_s: float, elapsed_s: float) -> float:
        later = [t for t in self.samples if t > elapsed_s]
        if len(self.samples) < MIN_THINK_SAMPLES or not later:
            return 0.0
        return sum(t < elapsed_s + load_s for t in later) / len(later)


@dataclass
class PreloadStats:
    """What the preloader did, and what became of its warm-ups.

    ``used``: pre-loaded models a request then ran on (the warm-up paid off);
    ``wasted``: pre-loaded models that left the cache before any request ran on them.
    A warm-up still resident and unused is neither yet (:meth:`Preloader.settle`).
    ``skipped``: passes that left a wanted model cold because its load would likely
    still run when the next request comes;
    ``stopped``: passes cut short by an arriving request; ``overlapped``: requests that
    arrived while a warm-up was loading (they waited for it); ``made_room``: models
    unloaded on a cache miss to keep the predicted next one.
    """

    warmed: list[str] = field(default_factory=list)
    evicted: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    used: list[str] = field(default_factory=list)
    wasted: list[str] = field(default_factory=list)
    skipped: int = 0
    stopped: int = 0
    overlapped: int = 0
    made_room: list[str] = field(default_factory=list)


class Preloader:
    """Runs :func:`plan_step` in the background between answers.

    The orchestrator calls :meth:`request_started` when a request comes in and
    :meth:`request_finished` when its answer is out; :meth:`schedule` then starts a pass.
    """

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
        self.think = ThinkTimes()
        self.load_s: dict[str, float] = {}  # last measured load time by model name
        # warmed model -> the cache's use count right after the warm-up
        self._pending: dict[str, int] = {}
        self._running = False
        self._again = False
        self._loading = False
        self._active = 0  # requests being served
        self._answered_at: float | None = None
        self.idle = trio.Event()
        self.idle.set()

    # -- request hooks -----------------------------------------------------------------

    def request_started(self) -> None:
        """A request came in: no new warm-up starts until it is answered."""
        now = trio.current_time()
        if self._active == 0 and self._answered_at is not None:
            self.think.add(now - self._answered_at)
        if self._loading:
            self.stats.overlapped += 1
        self._active += 1

    def request_finished(self) -> None:
        self._active = max(0, self._active - 1)
        self._answered_at = trio.current_time()

    async def make_room(self, model: str, category: str) -> str | None:
        """Before ``model`` is loaded for a miss on ``category``: if the cache is full,
        unload the idle model least likely to be asked after it. Returns what went."""
        rows = self.local.loaded()
        self._remember(rows)
        if len(rows) < self.max_models or any(model_matches(model, r.name) for r in rows):
            return None
        probs = model_probabilities(self.catalog, self.predictor.distribution(category))
        victim = choose_victim(probs, rows)
        if victim is None:
            return None
        try:
            await self.local.unload(victim)
        except Busy:
            return None  # it was leased meanwhile; the cache's policy decides then
        self.stats.made_room.append(victim)
        return victim

    # -- passes ------------------------------------------------------------------------

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

    def _remember(self, rows: Sequence[LoadedLike]) -> None:
        for row in rows:
            if row.load_s > 0:
                self.load_s[row.name.partition("@")[0]] = row.load_s

    async def run_once(self) -> list[PreloadStep]:
        """Do up to ``max_steps`` warm-ups for the current prediction, stopping as soon
        as a request is being served."""
        self.settle()
        done: list[PreloadStep] = []
        for _ in range(self.max_steps):
            if self._active:
                self.stats.stopped += 1
                break
            rows = self.local.loaded()
            self._remember(rows)
            probs = model_probabilities(self.catalog, self.predictor.distribution())
            since = trio.current_time() - (self._answered_at or trio.current_time())
            step = plan_step(
                probs, rows, max_models=self.max_models, min_probability=self.min_probability,
                load_s=self.load_s, risk=self.think.arrival_risk, elapsed_s=since,
            )  # fmt: skip
            if step is None:
                wanted = plan_step(
                    probs, rows, max_models=self.max_models, min_probability=self.min_probability
                )
                self.stats.skipped += wanted is not None
                break
            try:
                if step.evict is not None:
                    await self.local.unload(step.evict)
                    self.stats.evicted.append(step.evict)
                self._loading = True
                try:
                    await self.local.warm(step.load)
                finally:
                    self._loading = False
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
