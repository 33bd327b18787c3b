"""The small interfaces the orchestrator depends on, so it runs against a real
``LocalInference`` and a real ``Node`` as well as against modeled compute in simnet."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from p2pedge.ids import ModelId
from p2pedge.protocols.infer.codec import InferRequest
from p2pedge.runtime.completion import Completion


class LoadedLike(Protocol):
    """A row of ``LocalInference.loaded()`` (``CachedModel`` fits)."""

    @property
    def name(self) -> str: ...

    @property
    def in_use(self) -> int: ...

    @property
    def pinned(self) -> bool: ...

    @property
    def load_s(self) -> float: ...


class LocalInferenceLike(Protocol):
    """What the orchestrator needs of ``p2pedge.node.inference.LocalInference``."""

    async def resolve(self, model: str) -> tuple[ModelId, Path]: ...

    async def complete(
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
    ) -> Completion: ...

    async def warm(self, model: str) -> Any: ...

    async def unload(self, model: str) -> bool: ...

    def loaded(self) -> Sequence[LoadedLike]: ...


class CardLike(Protocol):
    """The capability-card fields routing and batching read."""

    @property
    def peer_id(self) -> str: ...

    @property
    def compute_gflops(self) -> float: ...

    @property
    def load(self) -> float: ...

    @property
    def models(self) -> Sequence[Any]: ...


class PeerDirectoryLike(Protocol):
    """Peers and a way to run a request on one (a Node through the infer protocol)."""

    async def find_peers(self, model: str | None = None) -> Sequence[CardLike]: ...

    async def run_remote(
        self, peer_id: str, request: InferRequest, *, timeout_s: float
    ) -> Completion: ...


class ShardedRunner(Protocol):
    """Hook for the layer-sharded path (another engineer's); ``None`` when absent."""

    async def can_run(self, model: str) -> bool: ...

    async def complete(self, model: str, request: InferRequest) -> Completion: ...
