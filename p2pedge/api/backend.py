"""What the HTTP API needs from a node, as one small interface.

The app never touches :class:`~p2pedge.node.node.Node` itself: :func:`p2pedge.node.api.api_for`
builds an :class:`ApiBackend` from a node's public methods, and tests may wrap or replace
it. Errors keep the project's types (``ModelNotCached``, ``PromptTooLong``, ``Busy``,
``PeerUnavailable``); the app maps them to HTTP.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import numpy.typing as npt

from p2pedge.api.schema import EmbeddingRequest, GenerationRequest
from p2pedge.runtime.sampling import Logprob

Where = Literal["local", "sharded", "peer", "specialist", "auto"]


@dataclass(frozen=True)
class Piece:
    """One generated token's text (may be empty) and its id, when the path knows it; its
    log-probability and likeliest alternatives when the request asked for them."""

    text: str
    token_id: int | None = None
    logprob: Logprob | None = None
    top_logprobs: tuple[Logprob, ...] = ()


@dataclass(frozen=True)
class Target:
    """Where a requested model name would run; ``warm`` is None where unknown. ``path``
    is a local model's directory as resolved (in a thread) when the target was found, so
    generating from it does not resolve the name again."""

    model: str
    where: Where
    category: str | None = None
    warm: bool | None = None
    path: Path | None = None


@dataclass(frozen=True)
class ModelEntry:
    id: str
    where: Where
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Routed:
    """A whole answer from the orchestrator, with where it ran."""

    text: str
    where: str
    peer_id: str | None
    specialist: str
    model: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str


@dataclass(frozen=True)
class Embedded:
    """One float32 vector per input text, and the tokens the texts took."""

    vectors: npt.NDArray[np.float32]
    tokens: int


class NotAnEmbedder(ValueError):
    """The model exists but does not make embeddings (400, not 404)."""


@dataclass
class Usage:
    """Filled by :meth:`ApiBackend.stream` when asked: prompt tokens, known at the end."""

    prompt_tokens: int = 0


@dataclass(frozen=True)
class BackendStats:
    cache_models: int = 0
    cache_bytes: int = 0
    cache_loads: int = 0
    cache_evictions: int = 0
    load: float = 0.0  # how full the node's inference queues are, 0..1
    peers: int = 0  # peers with a verified card, as last listed
    shard_sessions: int = 0  # sessions this node's shard server holds for peers
    bytes_served: int = 0  # blob bytes written to peers (libp2p streams and direct lanes)
    bytes_pulled: int = 0  # verified bytes this node's pulls committed (peers and registry)


class ApiBackend(Protocol):
    async def models(self) -> list[ModelEntry]:
        """Every model name a request may use, each with where it would run."""
        ...

    async def target(self, model: str) -> Target | None:
        """Where ``model`` would run, or None when nothing here or in the swarm has it."""
        ...

    def stream(
        self, target: Target, request: GenerationRequest, usage: Usage | None = None
    ) -> AsyncIterator[Piece]:
        """Generated pieces, one per token; closing the iterator stops the generation."""
        ...

    async def ask(self, target: Target, request: GenerationRequest) -> Routed:
        """A whole answer through the orchestrator (``auto``, specialists, peers)."""
        ...

    async def embed(self, target: Target, request: EmbeddingRequest) -> Embedded:
        """Vectors for the request's texts; NotAnEmbedder when ``target`` makes none."""
        ...

    async def swarm(self) -> dict[str, Any]:
        """What the swarm page shows: this node, peers, coverage, cache, pulls (bounded)."""
        ...

    def stats(self) -> BackendStats: ...
