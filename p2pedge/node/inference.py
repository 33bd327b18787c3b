"""LocalInference: trio glue between callers and the thread-based runtime.

Compute runs in worker threads, one prompt chunk or one token per hop
(``trio.to_thread.run_sync``), so the event loop runs between every two calls and a
cancel or a ``break`` out of the stream stops generation after at most the token being
computed. onnxruntime-genai 0.18 holds the GIL during each call, so the loop is only
free *between* calls: hops are kept short on purpose (see ``Generation``). For the same
reason a token whose recent cost is within ``RuntimeConfig.inline_step_s`` runs on the
loop's own thread when no other generation is running: the worker thread would not free
the loop meanwhile, and its two wake-ups cost 0.4-0.5 ms of a 14 ms SmolLM2 token here.
Requests for one model queue FIFO (trio's semaphore hands a released slot to the longest waiter)
and are refused with Busy beyond ``RuntimeConfig.queue_limit`` waiters. Up to
``RuntimeConfig.max_active_per_model`` of them run at once and take turns at the model, one
prompt chunk or one token each (trio's fair lock hands the turn to the longest waiter), so
concurrent streams advance round-robin at equal rates instead of one finishing first.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import numpy.typing as npt
import trio

from p2pedge.errors import Busy, ModelNotCached
from p2pedge.ids import ModelId
from p2pedge.runtime.cache import CachedModel, Lease, ModelCache, cache_key
from p2pedge.runtime.completion import Completion as Completion
from p2pedge.runtime.config import RuntimeConfig
from p2pedge.runtime.inline import StepCosts
from p2pedge.runtime.sampling import SamplingParams

if TYPE_CHECKING:  # onnxruntime-genai loads with the first generation, not with the node
    from p2pedge.runtime.genai_model import Generation, Token
    from p2pedge.runtime.tensor_model import Embeddings, TensorModel

ModelRef = str | ModelId
QUEUE_LIMIT = "inference.queue"  # the limit a full per-model queue names in its Busy
Resolver = Callable[[ModelId], Path]
_T = TypeVar("_T")
# mypy 2.4 rejects keyword arguments after trio's TypeVarTuple ``*args``; go untyped here.
_to_thread_abandonable: Callable[..., Awaitable[None]] = trio.to_thread.run_sync


@dataclass
class _Run:
    """Timing and counts of one generation, filled in as it streams."""

    start: float = field(default_factory=time.perf_counter)
    first: float | None = None
    last: float | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str = "cancelled"
    provider: str = ""

    def tok_per_s(self) -> float:
        if self.first is None or self.last is None or self.completion_tokens == 0:
            return 0.0
        if self.completion_tokens > 1 and self.last > self.first:
            return (self.completion_tokens - 1) / (self.last - self.first)
        return self.completion_tokens / max(self.last - self.start, 1e-9)


class _Queue:
    """Per-model FIFO admission with a bounded number of waiters."""

    def __init__(self, active: int, limit: int) -> None:
        self.slots = trio.Semaphore(active)
        self.turn = trio.Lock()  # fair: the running generations step in round-robin order
        self.active = active
        self.limit = limit
        self.decoding = 0  # generations of this model past their prompt
        self.kv_held = 0  # KV cache bytes the running generations reserved
        self._kv_freed = trio.Event()

    async def reserve_kv(self, need: int, budget: int) -> None:
        """Wait until ``need`` more KV bytes fit in ``budget`` (at once when nothing else
        holds any, so one generation always runs)."""
        while self.kv_held and self.kv_held + need > budget:
            await self._kv_freed.wait()
        self.kv_held += need

    def release_kv(self, held: int) -> None:
        self.kv_held -= held
        self._kv_freed.set()
        self._kv_freed = trio.Event()

    @property
    def occupied(self) -> int:
        """Requests running or waiting."""
        return self.active - self.slots.value + self.slots.statistics().tasks_waiting

    def admit(self, name: str) -> None:
        if self.slots.value == 0 and self.slots.statistics().tasks_waiting >= self.limit:
            raise Busy(
                f"{name}: {self.slots.statistics().tasks_waiting} requests already queued "
                f"(limit {self.limit}); retry later or ask another peer",
                limit=QUEUE_LIMIT,
                scope="total",
            )


def _checked(
    prompt: str | None,
    messages: Sequence[Mapping[str, str]] | None,
    max_tokens: int,
    temperature: float,
    top_p: float,
    top_k: int,
    seed: int | None,
    stop: Sequence[str] | None,
    logprobs: bool = False,
    top_logprobs: int = 0,
) -> SamplingParams:
    """Validate a request before anything is queued or computed."""
    if (prompt is None) == (messages is None):
        raise ValueError("pass exactly one of prompt= or messages=")
    return SamplingParams.make(
        max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
        stop=stop, logprobs=logprobs, top_logprobs=top_logprobs,
    )  # fmt: skip


class LocalInference:
    """Generation and tensor inference on models resolved to local directories.

    ``resolver`` maps a model id to its directory and raises ModelNotCached when it is
    not stored locally; it may touch the disk, so it runs in a worker thread.
    """

    def __init__(
        self,
        resolver: Resolver,
        config: RuntimeConfig | None = None,
        *,
        cache: ModelCache | None = None,
    ) -> None:
        self.config = config or RuntimeConfig()
        self.cache = cache or ModelCache(self.config)
        self._resolver = resolver
        self._queues: dict[str, _Queue] = {}
        self.costs = StepCosts(self.config.inline_step_s)
        self.steps_inline = 0
        self._generating = 0  # generations past their prompt, on any model

    # -- models ------------------------------------------------------------------------

    async def resolve(self, model: ModelRef) -> tuple[ModelId, Path]:
        mid = _model_id(model)
        path = await trio.to_thread.run_sync(self._resolver, mid)
        return mid, Path(path)

    async def warm(self, model: ModelRef) -> CachedModel:
        """Load ``model`` into the cache (in a worker thread) and describe it."""
        mid, path = await self.resolve(model)
        lease = await self._lease(mid, path)
        lease.release()
        key = cache_key(path)
        return next(m for m in self.cache.loaded() if cache_key(m.path) == key)

    async def pin(self, model: ModelRef) -> None:
        self.cache.pin((await self.resolve(model))[1])

    async def unpin(self, model: ModelRef) -> None:
        self.cache.unpin((await self.resolve(model))[1])

    async def unload(self, model: ModelRef) -> bool:
        """Drop a warm model; freeing a session's memory runs in a thread."""
        path = (await self.resolve(model))[1]
        return await trio.to_thread.run_sync(self.cache.unload, path)

    def loaded(self) -> list[CachedModel]:
        return self.cache.loaded()

    async def _lease(self, mid: ModelId, path: Path) -> Lease:
        while True:
            lease = self.cache.try_acquire(path)
            if lease is not None:
                return lease
            # Abandoning on cancel is safe: the load finishes in the background and the
            # model simply ends up warm; the lease is only taken here, on the loop.
            await _to_thread_abandonable(
                self.cache.ensure_loaded, path, str(mid), abandon_on_cancel=True
            )

    def load(self) -> float:
        """How full admission is, 0..1: requests running or waiting over what the queues
        admit. Announced in the node's card, where routing and federated maps read it."""
        queues = list(self._queues.values())
        capacity = sum(q.active + q.limit for q in queues)
        return min(1.0, sum(q.occupied for q in queues) / capacity) if capacity else 0.0

    def _queue(self, path: Path) -> _Queue:
        key = cache_key(path)
        queue = self._queues.get(key)
        if queue is None:
            queue = self._queues[key] = _Queue(
                self.config.max_active_per_model, self.config.queue_limit
            )
        return queue

    # -- generation --------------------------------------------------------------------

    def stream(
        self,
        model: ModelRef,
        *,
        messages: Sequence[Mapping[str, str]] | None = None,
        prompt: str | None = None,
        max_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
        stop: Sequence[str] | None = None,
        logprobs: bool = False,
        top_logprobs: int = 0,
        path: Path | None = None,
    ) -> AsyncGenerator[Token, None]:
        """Yield each generated Token (id and the text it made safe to show; with
        ``logprobs``, its log-probability and ``top_logprobs`` likeliest alternatives).
        ``path``: the model's directory when the caller has just resolved ``model`` (in a
        thread), which saves resolving it again.

        Parameters are validated here, before anything is queued or computed. Close the
        stream promptly when stopping early (``contextlib.aclosing``) so the model's
        slot is freed at once rather than when the generator is collected.
        """
        params = _checked(
            prompt, messages, max_tokens, temperature, top_p, top_k, seed, stop, logprobs,
            top_logprobs,
        )  # fmt: skip
        return self._tokens(_Run(), model, params, prompt, messages, path)

    async def _tokens(
        self,
        run: _Run,
        model: ModelRef,
        params: SamplingParams,
        prompt: str | None,
        messages: Sequence[Mapping[str, str]] | None,
        resolved: Path | None = None,
    ) -> AsyncGenerator[Token, None]:
        if resolved is None:
            mid, path = await self.resolve(model)
        else:
            mid, path = _model_id(model), resolved
        queue = self._queue(path)
        queue.admit(str(mid))
        async with queue.slots:
            lease = await self._lease(mid, path)
            gen: Generation | None = None
            decoding = False
            kv = 0
            try:
                from p2pedge.runtime.genai_model import GenaiModel  # loaded by the lease

                llm = lease.model
                if not isinstance(llm, GenaiModel):
                    raise ValueError(f"{mid} is a {llm.kind} model; use infer() for it")
                run.provider = llm.provider
                ids = await trio.to_thread.run_sync(
                    lambda: llm.encode_prompt(prompt=prompt, messages=messages)
                )
                run.prompt_tokens = len(ids)
                positions = min(len(ids) + params.max_tokens, llm.context_length)
                need = positions * llm.kv_bytes_per_position
                await queue.reserve_kv(need, self.config.kv_budget_bytes)
                kv = need  # reserved: released in the finally below
                gen = await trio.to_thread.run_sync(llm.start, ids, params)
                while True:
                    async with queue.turn:
                        if await trio.to_thread.run_sync(gen.prefill):
                            break
                self._generating += 1
                queue.decoding += 1
                decoding = True
                while not gen.done:
                    async with queue.turn:  # released before the token is yielded
                        token = await self._step(path, gen, queue)
                    run.last = time.perf_counter()
                    if run.first is None:
                        run.first = run.last
                    run.completion_tokens = gen.completion_tokens
                    if gen.finish_reason is not None:
                        run.finish_reason = gen.finish_reason
                    yield token
            finally:
                self._generating -= decoding
                queue.decoding -= decoding
                if kv:
                    queue.release_kv(kv)
                if gen is not None:
                    gen.close()
                lease.release()

    async def _step(self, path: Path, gen: Generation, queue: _Queue) -> Token:
        """One token: on this thread when recent tokens were cheap and no other model is
        generating (then a checkpoint lets the loop run before the next), else in a worker
        thread. This model's other generations do not count: they wait for the turn."""

        def timed() -> Token:
            began = time.perf_counter()
            token = gen.step()
            self.costs.record(path, 1, time.perf_counter() - began)
            return token

        if self.costs.may_inline(path, 1, busy=self._generating > queue.decoding):
            self.steps_inline += 1
            token = timed()
            await trio.lowlevel.checkpoint()
            return token
        return await trio.to_thread.run_sync(timed)

    async def generate(
        self,
        model: ModelRef,
        *,
        messages: Sequence[Mapping[str, str]] | None = None,
        prompt: str | None = None,
        max_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
        stop: Sequence[str] | None = None,
    ) -> AsyncGenerator[str, None]:
        """Yield text pieces as they become safe to show (whole UTF-8, no stop string)."""
        tokens = self.stream(
            model, messages=messages, prompt=prompt, max_tokens=max_tokens,
            temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, stop=stop,
        )  # fmt: skip
        async with aclosing(tokens):
            async for token in tokens:
                if token.text:
                    yield token.text

    async def complete(
        self,
        model: ModelRef,
        *,
        messages: Sequence[Mapping[str, str]] | None = None,
        prompt: str | None = None,
        max_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
        stop: Sequence[str] | None = None,
    ) -> Completion:
        """Run a generation to the end and return its text and measured figures.

        ``ttft_s`` counts from the call (queueing, loading and the prompt included).
        """
        run = _Run()
        params = _checked(prompt, messages, max_tokens, temperature, top_p, top_k, seed, stop)
        pieces: list[str] = []
        ids: list[int] = []
        tokens = self._tokens(run, model, params, prompt, messages)
        async with aclosing(tokens):
            async for token in tokens:
                pieces.append(token.text)
                ids.append(token.id)
        return Completion(
            text="".join(pieces),
            prompt_tokens=run.prompt_tokens,
            completion_tokens=run.completion_tokens,
            ttft_s=(run.first - run.start) if run.first is not None else 0.0,
            tok_per_s=run.tok_per_s(),
            finish_reason=run.finish_reason,
            provider=run.provider,
            token_ids=tuple(ids),
        )

    # -- tensor specialists ------------------------------------------------------------

    async def infer(
        self, model: ModelRef, inputs: Mapping[str, npt.NDArray[Any]]
    ) -> dict[str, npt.NDArray[Any]]:
        """Run a tensor model (classifier, embedder) on named input arrays."""
        for name, arr in inputs.items():
            if not isinstance(arr, np.ndarray):
                raise ValueError(f"input {name!r} must be a numpy array")
        return await self._on_tensor(model, lambda m: m.run(inputs), embedder=False)

    async def embed(self, model: ModelRef, texts: Sequence[str]) -> Embeddings:
        """Vectors for ``texts`` from an embedder (a tensor model whose manifest declares
        ``embedding``); ValueError for any other model. Queued like every request."""
        if not texts or not all(isinstance(t, str) and t for t in texts):
            raise ValueError("texts must be a non-empty list of non-empty strings")
        return await self._on_tensor(model, lambda m: m.embed(list(texts)), embedder=True)

    async def _on_tensor(
        self, model: ModelRef, fn: Callable[[TensorModel], _T], *, embedder: bool
    ) -> _T:
        """``fn`` on a tensor model, queued like every request, in a worker thread; a model
        of another kind (or not an embedder, when one is wanted) is a ValueError."""
        from p2pedge.runtime.tensor_model import TensorModel as Tensor

        mid, path = await self.resolve(model)
        queue = self._queue(path)
        queue.admit(str(mid))
        async with queue.slots:
            lease = await self._lease(mid, path)
            try:
                tm = lease.model
                if not isinstance(tm, Tensor):
                    raise ValueError(f"{mid} is a {tm.kind} model; use generate() for it")
                if embedder and tm.embedding is None:
                    raise ValueError(f"{mid} is not an embedding model")
                return await trio.to_thread.run_sync(fn, tm)
            finally:
                lease.release()

    def close(self) -> None:
        self.cache.close()


def _model_id(model: ModelRef) -> ModelId:
    if isinstance(model, ModelId):
        return model
    try:
        return ModelId.parse(model)
    except ValueError:
        raise ModelNotCached(str(model)) from None
