"""The model-facing half of :class:`~p2pedge.node.node.Node`: calls forwarded to its
:class:`~p2pedge.node.models.NodeModels` (store, runtime, shards, orchestrator)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from p2pedge.errors import LocalProtocolError
from p2pedge.ids import ModelId

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from p2pedge.models.manifest import Manifest
    from p2pedge.models.store import Store
    from p2pedge.node.models import NodeModels
    from p2pedge.orchestrator.orchestrator import Answer, FanOut, Orchestrator
    from p2pedge.runtime.cache import ModelCache
    from p2pedge.runtime.completion import Completion


class ModelsFacade:
    models: NodeModels

    # -- models (forwarded to NodeModels) ----------------------------------------------

    @property
    def cache(self) -> ModelCache:
        return self.models.inference.cache

    @property
    def store(self) -> Store:
        return self.models.store

    def add_model_dir(self, name: str, path: Path) -> None:
        """Use an imported model directory under ``name`` (no copy into the store)."""
        self.models.add_model_dir(name, path)

    def generate(self, model: str, *, route: str = "auto", **kwargs: Any) -> AsyncIterator[str]:
        """Stream text pieces: local when the model is here, else through shard servers.

        Keyword arguments: ``messages`` or ``prompt``, ``max_tokens``, ``temperature``,
        ``top_p``, ``top_k``, ``seed``, ``stop``. Leaving the loop stops generation.
        """
        return self.models.generate(model, route=route, **kwargs)

    async def complete(self, model: str, *, route: str = "auto", **kwargs: Any) -> Completion:
        """The whole answer with token counts and timings (time to first token, tok/s)."""
        return await self.models.complete(model, route=route, **kwargs)

    async def warm(self, model: str) -> Any:
        """Load ``model`` into the warm cache now (in a worker thread)."""
        return await self.models.inference.warm(model)

    async def pull(
        self, model: str, *, registry: str | None = None, files: Sequence[str] | None = None
    ) -> Path:
        """Fetch ``model`` from peers and/or a registry, verifying every chunk."""
        return await self.models.pull(model, registry=registry, files=files)

    async def publish(
        self,
        directory: Path,
        model: str,
        key: Ed25519PrivateKey | Path,
        *,
        category: str = "llm",
        tags: Sequence[str] = (),
    ) -> Manifest:
        """Sign an imported model directory as ``model`` (``name@version``) with ``key`` (a
        PEM file or key) into this node's store and announce it, so peers can pull it, or
        only a shard's files of it, from here."""
        return await self.models.distribution.publish(
            Path(directory), ModelId.parse(model), key, category=category, tags=tags
        )

    # -- orchestrator ------------------------------------------------------------------

    def _orchestrator(self) -> Orchestrator:
        if self.models.orchestrator is None:
            raise LocalProtocolError("node is not running; use `async with Node(...)`")
        return self.models.orchestrator

    async def ask(self, text: str, category: str | None = None, **kwargs: Any) -> Answer:
        """Route ``text`` to a specialist (classifying it when no category is given) and
        run it locally, on a peer or sharded; the answer carries the decision and why."""
        return await self._orchestrator().ask(text, category, **kwargs)

    async def ask_many(self, text: str, categories: Sequence[str], **kwargs: Any) -> FanOut:
        """Run several specialists on ``text`` concurrently; every answer with timings."""
        return await self._orchestrator().ask_many(text, categories, **kwargs)

    async def map(
        self, model_or_specialist: str, prompts: Sequence[str], **kwargs: Any
    ) -> list[Answer]:
        """Spread independent prompts over peers with the model; results in input order."""
        return await self._orchestrator().map(model_or_specialist, prompts, **kwargs)
