"""The orchestrator: classify, pick a specialist, pick a place, run, learn, pre-load.

Every dependency is a small interface (:mod:`interfaces`), so the same class serves a
real Node with real models and simnet with modeled compute.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace

import trio

from p2pedge.errors import ModelNotCached, P2PEdgeError
from p2pedge.orchestrator.catalog import Catalog, Specialist, model_matches, registered_alias
from p2pedge.orchestrator.classifier import Classification, NaiveBayesClassifier, default_classifier
from p2pedge.orchestrator.federated import MapStats, Worker, capacity, federated_map
from p2pedge.orchestrator.interfaces import (
    CardLike,
    LocalInferenceLike,
    PeerDirectoryLike,
    ShardedRunner,
)
from p2pedge.orchestrator.predictor import NextCategoryPredictor
from p2pedge.orchestrator.preload import Preloader
from p2pedge.orchestrator.router import (
    LOCAL,
    Decision,
    LocalView,
    RoutingPolicy,
    Where,
    place,
)
from p2pedge.protocols.infer.codec import GenParams, InferRequest
from p2pedge.protocols.infer.handler import next_request_id
from p2pedge.runtime.completion import Completion

Merge = Callable[[Sequence["Answer"]], str]


@dataclass(frozen=True)
class Answer:
    """A completion plus the decision that produced it."""

    text: str
    decision: Decision
    prompt_tokens: int
    completion_tokens: int
    ttft_s: float
    tok_per_s: float
    finish_reason: str
    provider: str
    elapsed_s: float
    was_warm: bool


@dataclass(frozen=True)
class FanOut:
    """Every answer of a fan-out (in the order asked), failures by specialist, the merge."""

    answers: list[Answer]
    failures: dict[str, P2PEdgeError]
    merged: str | None
    elapsed_s: float


def join_merge(answers: Sequence[Answer]) -> str:
    """The simplest merge: each specialist's answer under its name."""
    return "\n\n".join(f"[{a.decision.specialist}] {a.text.strip()}" for a in answers)


@dataclass
class Orchestrator:
    local: LocalInferenceLike | None
    peers: PeerDirectoryLike | None
    catalog: Catalog = field(default_factory=Catalog.load)
    predictor: NextCategoryPredictor = field(default_factory=NextCategoryPredictor)
    classifier: NaiveBayesClassifier = field(default_factory=default_classifier)
    policy: RoutingPolicy = field(default_factory=RoutingPolicy)
    sharded: ShardedRunner | None = None
    nursery: trio.Nursery | None = None
    max_models: int = 2
    preload: bool = True
    remote_timeout_s: float = 60.0
    local_speed: float = 1.0
    load_times: dict[str, float] = field(default_factory=dict)
    preloader: Preloader | None = None
    # names the user registered models under here (dirs, stored ids); lets a catalog
    # model find one registered under a shorter or longer name
    local_names: Callable[[], Iterable[str]] | None = None

    def __post_init__(self) -> None:
        if self.local is not None and self.preload and self.preloader is None:
            self.preloader = Preloader(
                self.local, self.catalog, self.predictor, max_models=self.max_models
            )

    # -- decisions -------------------------------------------------------------------

    def classify(self, text: str) -> Classification:
        return self.classifier.classify(text)

    async def _local_view(self, spec: Specialist) -> LocalView:
        if self.local is None:
            return LocalView(False, False)
        rows = self.local.loaded()
        for row in rows:
            self.load_times[row.name.partition("@")[0]] = row.load_s
        warm = any(model_matches(spec.model, r.name) for r in rows)
        try:
            await self.local.resolve(spec.model)
            stored = True
        except ModelNotCached:
            stored = False
        return LocalView(warm, stored, self.load_times.get(spec.model_id.name))

    async def _bind(self, spec: Specialist) -> tuple[Specialist, str]:
        """``spec`` with its model renamed to the one registered here under another name
        (see :func:`registered_alias`) when its own name is not held; and a note why."""
        if self.local is None or self.local_names is None:
            return spec, ""
        try:
            await self.local.resolve(spec.model)
            return spec, ""
        except ModelNotCached:
            pass  # not held under the catalog's name: look for the user's name for it
        alias = registered_alias(spec.model, self.local_names())
        if alias is None:
            return spec, ""
        return replace(spec, model=alias), f" ({spec.model} is registered here as {alias})"

    async def _cards(self, spec: Specialist) -> list[CardLike]:
        if self.peers is None:
            return []
        return list(await self.peers.find_peers(spec.model))

    async def decide(
        self, text: str, category: str | None = None, *, assigned: dict[str, int] | None = None
    ) -> tuple[Decision, LocalView]:
        """Category (given or classified), specialist, then place; raises UnknownCategory."""
        classification = None
        if category is None:
            classification = self.classify(text)
            category = classification.category
        spec, alias_note = await self._bind(self.catalog.resolve(category))
        view = await self._local_view(spec)
        cards = await self._cards(spec)
        sharded = self.sharded is not None and await self.sharded.can_run(spec.model)
        where = place(
            spec, view, cards, policy=self.policy, sharded=sharded, assigned=assigned or {}
        )
        decision = Decision(
            spec.category, spec.name, spec.model, where.where, where.peer_id,
            where.reason + alias_note, classification,
        )  # fmt: skip
        return decision, view

    # -- running ---------------------------------------------------------------------

    def _request(self, spec: Specialist, text: str, max_tokens: int | None) -> InferRequest:
        messages = tuple((m["role"], m["content"]) for m in spec.messages(text))
        params = GenParams(
            max_tokens=max_tokens or spec.max_tokens,
            temperature=spec.temperature,
            top_p=spec.top_p,
            top_k=spec.top_k,
        )
        return InferRequest(next_request_id(), spec.model, messages, None, params, spec.name)

    async def _execute(self, where: str, peer_id: str | None, request: InferRequest) -> Completion:
        if where == "local":
            if self.local is None:
                raise ModelNotCached(request.model)
            p = request.params
            return await self.local.complete(
                request.model, messages=request.chat(), max_tokens=p.max_tokens,
                temperature=p.temperature, top_p=p.top_p, top_k=p.top_k, seed=p.seed,
                stop=list(p.stop) or None,
            )  # fmt: skip
        if where == "peer" and peer_id is not None and self.peers is not None:
            return await self.peers.run_remote(peer_id, request, timeout_s=self.remote_timeout_s)
        if where == "sharded" and self.sharded is not None:
            return await self.sharded.complete(request.model, request)
        raise ModelNotCached(request.model)

    async def ask(
        self, text: str, category: str | None = None, *, max_tokens: int | None = None
    ) -> Answer:
        """Answer ``text`` with the right specialist; the decision comes back with it.

        The pre-loader is told when the request comes in (no warm-up starts while it is
        served) and, on a local miss, frees the slot least likely to be needed next.
        """
        if self.preloader is not None:
            self.preloader.request_started()
        try:
            decision, view = await self.decide(text, category)
            if self.preloader is not None and decision.where == "local" and not view.warm:
                await self.preloader.make_room(decision.model, decision.category)
            answer = await self._run(decision, view, text, max_tokens)
        finally:
            if self.preloader is not None:
                self.preloader.request_finished()
        self._learn(decision.category)
        return answer

    async def _run(
        self,
        decision: Decision,
        view: LocalView,
        text: str,
        max_tokens: int | None,
        spec: Specialist | None = None,
    ) -> Answer:
        # the decision's model, which may be the name the user registered it under
        spec = spec or replace(self.catalog.resolve(decision.specialist), model=decision.model)
        start = time.perf_counter()
        result = await self._execute(
            decision.where, decision.peer_id, self._request(spec, text, max_tokens)
        )
        warm = view.warm if decision.where == "local" else False
        return _answer(result, decision, start, warm)

    def _learn(self, category: str) -> None:
        self.predictor.observe(category)
        if self.preloader is not None and self.nursery is not None:
            self.preloader.schedule(self.nursery)

    async def ask_many(
        self,
        text: str,
        categories: Sequence[str],
        *,
        merge: Merge | None = None,
        max_tokens: int | None = None,
    ) -> FanOut:
        """Run several specialists on ``text`` concurrently, spread over local and peers."""
        for category in categories:
            self.catalog.resolve(category)
        start = time.perf_counter()
        assigned: dict[str, int] = {}
        plans = []
        for category in categories:
            decision, view = await self.decide(text, category, assigned=assigned)
            key = decision.peer_id if decision.where == "peer" and decision.peer_id else LOCAL
            assigned[key] = assigned.get(key, 0) + 1
            plans.append((decision, view))
        results: list[Answer | None] = [None] * len(plans)
        failures: dict[str, P2PEdgeError] = {}

        async def one(i: int, decision: Decision, view: LocalView) -> None:
            try:
                results[i] = await self._run(decision, view, text, max_tokens)
            except P2PEdgeError as exc:
                failures[decision.specialist] = exc

        async with trio.open_nursery() as nursery:
            for i, (decision, view) in enumerate(plans):
                nursery.start_soon(one, i, decision, view)
        answers = [a for a in results if a is not None]
        merged = merge(answers) if merge is not None and answers else None
        return FanOut(answers, failures, merged, time.perf_counter() - start)

    async def map(
        self,
        model_or_specialist: str,
        prompts: Iterable[str],
        *,
        max_tokens: int | None = None,
        include_local: bool = True,
        slots_per_peer: int = 1,
        stats: MapStats | None = None,
    ) -> list[Answer]:
        """Run independent prompts over every peer with the model; input order kept."""
        spec, _ = await self._bind(self._spec_for(model_or_specialist))
        view = await self._local_view(spec)
        cards = await self._cards(spec)
        workers = [Worker(c.peer_id, capacity(c), slots_per_peer) for c in cards]
        if include_local and view.stored and LOCAL not in {w.peer_id for w in workers}:
            workers.insert(0, Worker(LOCAL, self.local_speed, 1))

        async def execute(worker: str, prompt: str) -> Answer:
            where: Where = "local" if worker == LOCAL else "peer"
            decision = Decision(
                spec.category, spec.name, spec.model, where, None if worker == LOCAL else worker,
                "federated map: pulled by a free worker", None,
            )  # fmt: skip
            return await self._run(decision, view, prompt, max_tokens, spec)

        return await federated_map(execute, prompts, workers, stats=stats)

    async def chat_on_peer(
        self,
        peer_id: str,
        model: str,
        *,
        messages: Sequence[Mapping[str, str]] | None = None,
        prompt: str | None = None,
        max_tokens: int,
        temperature: float,
        top_p: float,
        top_k: int = 0,
        seed: int | None = None,
        stop: Sequence[str] = (),
    ) -> Answer:
        """A whole conversation (or a raw prompt) on ``peer_id``, which holds ``model``
        whole, with the caller's sampling: what the HTTP API sends for such a model. The
        infer protocol carries the messages; its limits refuse what is too large
        (LocalProtocolError, before anything is sent)."""
        if self.peers is None:
            raise ModelNotCached(model)
        params = GenParams(
            max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
            seed=seed, stop=tuple(stop),
        )  # fmt: skip
        chat = None if messages is None else tuple((m["role"], m["content"]) for m in messages)
        request = InferRequest(next_request_id(), model, chat, prompt, params, model)
        decision = Decision(
            "raw", model, model, "peer", peer_id, "the caller chose the peer", None
        )  # fmt: skip
        start = time.perf_counter()
        result = await self.peers.run_remote(peer_id, request, timeout_s=self.remote_timeout_s)
        return _answer(result, decision, start, False)

    def _spec_for(self, name: str) -> Specialist:
        """A specialist by name or category, else a plain one over a model id."""
        if name in self.catalog.specialists or name in self.catalog.categories:
            return self.catalog.resolve(name)
        if "@" in name or any(model_matches(m, name) for m in self.catalog.models()):
            return Specialist(name=name, category="raw", model=name, temperature=0.0)
        return self.catalog.resolve(name)


def _answer(result: Completion, decision: Decision, start: float, warm: bool) -> Answer:
    """What a run returned, with the decision that sent it there and its wall time."""
    return Answer(
        text=result.text,
        decision=decision,
        prompt_tokens=result.prompt_tokens,
        completion_tokens=result.completion_tokens,
        ttft_s=result.ttft_s,
        tok_per_s=result.tok_per_s,
        finish_reason=result.finish_reason,
        provider=result.provider,
        elapsed_s=time.perf_counter() - start,
        was_warm=warm,
    )
