"""The node's model services: store, local runtime, blob serving, pulls and shards.

The Node owns one :class:`NodeModels` and gives it a :class:`~p2pedge.node.context.NodeContext`
(the host, peer queries, the card's setters, lanes and the nursery), never itself.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import AsyncGenerator, Mapping, Sequence
from contextlib import aclosing
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from p2pedge.errors import (
    IntegrityError,
    MemoryBudgetError,
    ModelLoadError,
    ModelNotCached,
    PeerUnavailable,
)
from p2pedge.ids import ModelId
from p2pedge.models.keys import TrustStore
from p2pedge.models.manifest import ManifestError
from p2pedge.models.store import Store
from p2pedge.node.distribution import Distribution
from p2pedge.node.inference import LocalInference
from p2pedge.records.card import CachedModel, covers_model
from p2pedge.records.facts import FACTS_FILE, read_facts
from p2pedge.runtime.completion import Completion
from p2pedge.runtime.config import RuntimeConfig
from p2pedge.runtime.sampling import SamplingParams

if TYPE_CHECKING:
    from p2pedge.node.context import NodeContext
    from p2pedge.orchestrator.orchestrator import Orchestrator
    from p2pedge.protocols.blob.handler import BlobService
    from p2pedge.protocols.infer.codec import InferRequest
    from p2pedge.protocols.pipeline.handler import PipelineServer
    from p2pedge.runtime.text import TextCodec

log = logging.getLogger("p2pedge.node")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", FACTS_FILE)
MAX_TEXT_CODECS = 16


def int8_activations(model_dir: Path) -> bool:
    """Whether a model's facts say its matmuls take 8-bit activations: replicas then agree
    only within the quantized tolerance, so checks must use it (or ban honest servers)."""
    try:
        return bool(read_facts(model_dir / FACTS_FILE).int8_activations)
    except (ModelLoadError, OSError, ValueError, TypeError):  # no or unreadable facts
        return False


def _dir_digest(path: Path) -> str:
    """A cheap identity for a registered directory: hash of its names, sizes and arch file
    (a few KB of JSON; the weights are never read)."""
    h = hashlib.sha256()
    for item in sorted(path.iterdir()):
        if item.is_file():
            h.update(f"{item.name}:{item.stat().st_size};".encode())
    facts = path / FACTS_FILE
    if facts.is_file():
        h.update(facts.read_bytes())
    return h.hexdigest()


class NodeModels:
    def __init__(self, ctx: NodeContext) -> None:
        config = ctx.config
        tuning = config.tuning
        self.ctx = ctx
        self.store = Store(config.models_dir or config.data_dir / "store")
        self.trust = TrustStore.load(config.trusted_publishers)
        self.dirs: dict[str, Path] = {}
        # the inline budget serves local tokens and shard steps alike
        runtime = RuntimeConfig(inline_step_s=tuning.inline_step_ms / 1000)
        if config.tuning.threads:
            runtime = replace(runtime, intra_op_threads=config.tuning.threads)
        self.runtime = runtime
        self.inference = LocalInference(self.resolve, runtime)
        self.pipeline: PipelineServer | None = None
        self.blobs: BlobService | None = None  # serves the store's blobs once started
        self.orchestrator: Orchestrator | None = None
        self.shard_bans: dict[str, tuple[float, int]] = {}  # shared by sharded sessions
        self._text_codecs: dict[Path, TextCodec] = {}  # tokenizers the sharded path loaded
        self._card_readings = 0  # counts store readings for the card; the newest one wins
        self.distribution = Distribution(
            ctx, self.store, self.trust, self.resolve, self.refresh_card_models
        )
        for name, path in config.model_dirs:
            self._register_dir(name, Path(path))

    # -- what is local -----------------------------------------------------------------

    def add_model_dir(self, name: str, path: Path) -> None:
        """Use an imported model directory as ``name`` without copying it into the store.

        Synchronous on purpose (a user's setup call): it only stats files and reads the
        stored manifests, never a model's weights."""
        self._register_dir(name, Path(path))
        self._card_readings += 1  # a refresh still reading in a thread is now older
        self.ctx.set_models(self.cached_models())

    def _register_dir(self, name: str, path: Path) -> None:
        if not (path / "genai_config.json").is_file() and not (path / FACTS_FILE).is_file():
            raise ModelNotCached(f"{name} ({path} is not a model directory)")
        self.dirs[ModelId.parse(name).name] = path

    def resolve(self, model: ModelId) -> Path:
        """The model's directory. Blocking: the first use of a stored model hashes every file
        it materializes, so async code calls this (and :meth:`has_local`) in a thread."""
        if model.name in self.dirs:
            return self.dirs[model.name]
        try:
            resolved = self.store.resolve(model)
            if self.store.has_model(resolved):
                return self.store.materialize(resolved)
        except (ModelNotCached, ManifestError, OSError, KeyError) as exc:
            raise ModelNotCached(str(model)) from exc
        raise ModelNotCached(str(model))

    def has_local(self, model: str) -> bool:
        try:
            self.resolve(ModelId.parse(model))
        except (ModelNotCached, ValueError):
            return False
        return True

    def cached_models(self) -> list[CachedModel]:
        """What the card offers. Blocking (reads every stored manifest): async code uses
        :meth:`refresh_card_models`."""
        return self._cached_models(sorted(self.dirs.items()))

    def _cached_models(self, dirs: Sequence[tuple[str, Path]]) -> list[CachedModel]:
        models = [CachedModel(f"{name}@local", _dir_digest(path)) for name, path in dirs]
        for model in self.store.list_models():
            if not self.store.has_model(model):
                continue  # only some files (a shard's): not a model this node can run
            digest = hashlib.sha256(self.store.manifest_bytes(model)).hexdigest()
            models.append(CachedModel(str(model), digest))
        return models

    async def refresh_card_models(self) -> None:
        """Put the models held now into the node's card, reading the store in a thread.
        When refreshes overlap, the one begun last wins: an older reading is dropped."""
        reading = self._card_readings = self._card_readings + 1
        dirs = sorted(self.dirs.items())  # read here: add_model_dir changes it on the loop
        models = await trio.to_thread.run_sync(self._cached_models, dirs)
        if reading == self._card_readings:
            self.ctx.set_models(models)

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        """Serve blobs, inference and shards once the node's network is up."""
        await self.refresh_card_models()
        self._start_orchestrator()
        if self.ctx.config.local_only:
            return
        from p2pedge.protocols.blob.handler import BlobService, announce_store

        self.blobs = BlobService(self.store, limits=self.ctx.config.limits.blob)
        await self.distribution.serve_blobs(self.blobs)  # libp2p streams and the lane
        self.ctx.nursery.start_soon(announce_store, self.ctx, self.store)
        if self.ctx.config.serve:
            await self._start_shards()

    async def _start_shards(self) -> None:
        from p2pedge.protocols.pipeline.serving import start_pipeline_server

        serve = []
        for spec in self.ctx.config.serve:
            model = ModelId.parse(spec.model)
            try:
                path, layers = await self.distribution.shard_source(model, spec.layers)
            except MemoryBudgetError:
                raise  # says itself what does not fit
            except (
                PeerUnavailable,
                IntegrityError,
                ModelNotCached,
                KeyError,
                ValueError,
                OSError,
            ) as exc:
                raise ModelLoadError(f"cannot serve {spec.model}: {exc}") from exc
            serve.append((model.name, path, layers))
        try:
            self.pipeline = await start_pipeline_server(
                self.ctx,
                serve,
                shards_root=self.ctx.config.data_dir / "shards",
                runtime=self.runtime,
                inline_step_s=self.ctx.config.tuning.inline_step_ms / 1000,
                limits=self.ctx.config.limits.pipeline,
                memory_budget=self.ctx.config.memory_budget,
            )
        except MemoryBudgetError:
            raise
        except (ValueError, OSError) as exc:
            raise ModelLoadError(
                f"cannot serve {[s.model for s in self.ctx.config.serve]}: {exc}"
            ) from exc
        for served in self.ctx.card.layers_served:
            log.info("serving %s blocks %d-%d", served.model, served.start, served.end)

    def _start_orchestrator(self) -> None:
        from p2pedge.orchestrator import NodePeers, Orchestrator, install_infer

        peers: Any = _NoPeers() if self.ctx.config.local_only else NodePeers(self.ctx)
        if not self.ctx.config.local_only:
            install_infer(self.ctx, self.inference, limits=self.ctx.config.limits.infer)
        self.orchestrator = Orchestrator(
            self.inference,
            peers,
            sharded=_ShardedRunner(self),
            nursery=self.ctx.nursery,
            max_models=self.inference.cache.config.max_models,
            local_names=self.registered_names,
        )

    def registered_names(self) -> list[str]:
        """Names models are registered under here: dirs as named, stored models by id (as
        the card last read them from the store, so this never blocks)."""
        stored = [m.id for m in self.ctx.card.models if not m.id.endswith("@local")]
        return [*self.dirs, *stored]

    def close(self) -> None:
        self.inference.close()

    # -- pulls and publishing (see distribution.py) -----------------------------------

    async def pull(
        self, model: str, *, registry: str | None = None, files: Sequence[str] | None = None
    ) -> Path:
        """Fetch ``model`` from peers (and the registry, if given), verified chunk by chunk."""
        return await self.distribution.pull(ModelId.parse(model), registry, files)

    # -- generation --------------------------------------------------------------------

    async def _route(self, model: str, route: str) -> str:
        """``auto`` is local when the model is here; finding out may hash its files (the
        first use of a stored model), so that check runs in a thread."""
        if route not in ("auto", "local", "sharded"):
            raise ValueError("route must be auto, local or sharded")
        if route == "auto":
            if self.ctx.config.local_only:
                return "local"
            local = await trio.to_thread.run_sync(self.has_local, model)
            return "local" if local else "sharded"
        return route

    async def generate(
        self, model: str, *, route: str = "auto", **kwargs: Any
    ) -> AsyncGenerator[str, None]:
        """Text pieces, locally when the model is here, else through shard servers."""
        if await self._route(model, route) == "local":
            async with aclosing(self.inference.generate(model, **kwargs)) as pieces:
                async for piece in pieces:
                    yield piece
            return
        async with aclosing(self.sharded_stream(model, **kwargs)) as pieces:
            async for piece, _ in pieces:
                if piece:
                    yield piece

    async def complete(self, model: str, *, route: str = "auto", **kwargs: Any) -> Completion:
        if await self._route(model, route) == "local":
            return await self.inference.complete(model, **kwargs)
        return await self.complete_sharded(model, **kwargs)

    async def complete_sharded(self, model: str, **kwargs: Any) -> Completion:
        start = time.perf_counter()
        first: float | None = None
        text: list[str] = []
        ids: list[int] = []
        info: dict[str, Any] = {}
        async with aclosing(self.sharded_stream(model, info=info, **kwargs)) as pieces:
            async for piece, token in pieces:
                first = first if first is not None else time.perf_counter() - start
                text.append(piece)
                ids.append(token)
        elapsed = time.perf_counter() - start
        decode = elapsed - (first or 0.0)
        return Completion(
            text="".join(text),
            prompt_tokens=info.get("prompt_tokens", 0),
            completion_tokens=len(ids),
            ttft_s=first or 0.0,
            tok_per_s=(len(ids) - 1) / decode if len(ids) > 1 and decode > 0 else 0.0,
            finish_reason=info.get("finish_reason", "cancelled"),
            provider="sharded",
            token_ids=tuple(ids),
            route=tuple(info.get("route", ())),
            recoveries=info.get("recoveries", 0),
        )

    def _tokenizer_dir(self, model: str) -> Path:
        mid = ModelId.parse(model)
        if mid.name in self.dirs:
            return self.dirs[mid.name]
        try:
            return self.store.materialize(self.store.resolve(mid), list(TOKENIZER_FILES))
        except (ModelNotCached, ManifestError, OSError, KeyError) as exc:
            hint = f"the sharded path needs its tokenizer; pull it with files={TOKENIZER_FILES}"
            raise ModelNotCached(f"{model} ({hint})") from exc

    async def _text_codec(self, model: str) -> TextCodec:
        """The model's tokenizer and chat template, loaded once per directory and off the
        event loop (parsing SmolLM2's tokenizer.json took 0.2 s of CPU in a one-off profile)."""
        from p2pedge.runtime.text import TextCodec

        path = await trio.to_thread.run_sync(self._tokenizer_dir, model)
        codec = self._text_codecs.get(path)
        if codec is None:
            codec = await trio.to_thread.run_sync(TextCodec, path)
            if len(self._text_codecs) >= MAX_TEXT_CODECS:
                del self._text_codecs[next(iter(self._text_codecs))]
            self._text_codecs[path] = codec
        return codec

    async def sharded_stream(
        self,
        model: str,
        *,
        messages: Sequence[Mapping[str, str]] | None = None,
        prompt: str | None = None,
        max_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
        stop: Sequence[str] | None = None,
        info: dict[str, Any] | None = None,
    ) -> AsyncGenerator[tuple[str, int], None]:
        """(text piece, token id) pairs through shard servers; ``info`` gets the route."""
        from p2pedge.protocols.pipeline.client import ClientConfig
        from p2pedge.protocols.pipeline.sampling import greedy, logits_needed, make_sampler
        from p2pedge.protocols.pipeline.serving import open_sharded_session

        params = SamplingParams.make(
            max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
            seed=seed, stop=stop,
        )  # fmt: skip
        codec = await self._text_codec(model)
        ids = await trio.to_thread.run_sync(
            partial(codec.prompt_ids, messages=messages, prompt=prompt)
        )
        sampler = (
            greedy
            if params.greedy
            else make_sampler(params.temperature, params.top_k, params.seed or 0, params.top_p)
        )
        name = ModelId.parse(model).name
        verify = self.ctx.config.tuning.shard_verify
        if verify is not None and not verify.quantized:
            path = await trio.to_thread.run_sync(self._tokenizer_dir, model)
            if await trio.to_thread.run_sync(int8_activations, path):
                verify = replace(verify, quantized=True)  # 8-bit matmuls differ more
        config = ClientConfig(
            max_length=len(ids) + max_tokens + 1,
            step_timeout=self.ctx.config.tuning.shard_step_timeout,
            logits_top_k=logits_needed(params.temperature, params.top_k),
            push=self.ctx.config.tuning.shard_push,
            ring=self.ctx.config.tuning.shard_ring,
            slowdown=self.ctx.config.tuning.shard_slowdown,
            verify=verify,
        )
        decoder = codec.decoder()
        stops = list(params.stop)
        session = await open_sharded_session(self.ctx, name, config=config, bans=self.shard_bans)
        async with session:
            if info is not None:
                info["session"] = session
            produced = ""
            finish = "length"  # unless the model or a stop string ends it first
            tokens = session.stream(ids, max_tokens, eos_id=codec.eos_id, sampler=sampler)
            async with aclosing(tokens):
                async for token in tokens:
                    if token == codec.eos_id:
                        finish = "stop"
                        yield "", token  # reported like the local path: the id, no text
                        break
                    piece = decoder.push(token)
                    produced += piece
                    yield piece, token
                    if any(s in produced for s in stops):
                        finish = "stop"
                        break
            if info is not None:
                info.update(
                    finish_reason=finish,
                    prompt_tokens=len(ids),
                    route=[f"{h.peer_id}:{h.layers}" for h in session.route],
                    recoveries=session.recoveries,
                )


class _NoPeers:
    """The peer directory of a node in local mode: nobody else."""

    async def find_peers(self, model: str | None = None) -> list[Any]:
        return []

    async def run_remote(self, peer_id: str, request: InferRequest, *, timeout_s: float) -> Any:
        raise ModelNotCached(f"{request.model} (local mode: no peers)")


class _ShardedRunner:
    """The orchestrator's last resort: the model's blocks served across the swarm."""

    def __init__(self, models: NodeModels) -> None:
        self.models = models

    async def can_run(self, model: str) -> bool:
        if self.models.ctx.config.local_only:
            return False
        name = ModelId.parse(model).name
        return covers_model(await self.models.ctx.find_peers(), name)

    async def complete(self, model: str, request: InferRequest) -> Completion:
        params = request.params
        return await self.models.complete_sharded(
            model,
            messages=request.chat() if request.messages is not None else None,
            prompt=request.prompt,
            max_tokens=params.max_tokens,
            temperature=params.temperature,
            top_p=params.top_p,
            top_k=params.top_k,
            seed=params.seed,
            stop=list(params.stop),
        )
