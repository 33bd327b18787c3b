"""Helpers for the API tests: a gate between the node's tokens and the app, and a wait."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Awaitable, Callable
from contextlib import aclosing
from typing import Any

import trio

from p2pedge.api.backend import (
    ApiBackend,
    BackendStats,
    Embedded,
    ModelEntry,
    Piece,
    Routed,
    Target,
    Usage,
)
from p2pedge.api.schema import EmbeddingRequest, GenerationRequest

Serve = Callable[..., Any]  # the ``serve`` fixture: ``async with serve(**app_kwargs) as api``
MODEL = "smollm2-135m-instruct"  # the catalog's model (so ``auto`` finds it); tiny here


class Gated:
    """The node's backend with a gate between its tokens and the app: each token the
    runtime computes waits for the test to ``release`` it. ``computed`` counts tokens the
    runtime produced, ``released`` those let through; ``closed`` is set when the app
    closes the stream."""

    def __init__(self, inner: ApiBackend) -> None:
        self.inner = inner
        self.gate = trio.Semaphore(0)
        self.computed = 0
        self.released = 0
        self.closed = trio.Event()
        self.reached: dict[int, trio.Event] = {}

    def release(self, n: int = 1) -> None:
        for _ in range(n):
            self.gate.release()

    async def wait_released(self, n: int) -> None:
        if self.released < n:
            await self.reached.setdefault(n, trio.Event()).wait()

    async def models(self) -> list[ModelEntry]:
        return await self.inner.models()

    async def target(self, model: str) -> Target | None:
        return await self.inner.target(model)

    async def ask(self, target: Target, request: GenerationRequest) -> Routed:
        return await self.inner.ask(target, request)

    def stats(self) -> BackendStats:
        return self.inner.stats()

    async def embed(self, target: Target, request: EmbeddingRequest) -> Embedded:
        return await self.inner.embed(target, request)

    async def swarm(self) -> dict[str, Any]:
        return await self.inner.swarm()

    async def stream(
        self, target: Target, request: GenerationRequest, usage: Usage | None = None
    ) -> AsyncGenerator[Piece, None]:
        pieces = self.inner.stream(target, request, usage)
        try:
            async with aclosing(pieces):  # type: ignore[type-var]
                async for piece in pieces:
                    self.computed += 1
                    await self.gate.acquire()
                    self.released += 1
                    if self.released in self.reached:
                        self.reached[self.released].set()
                    yield piece
        finally:
            self.closed.set()


async def wait_until(check: Callable[[], bool | Awaitable[bool]], timeout: float = 20.0) -> None:
    """Wait for a state only observable by reading it (e.g. a queue's occupancy)."""
    with trio.fail_after(timeout):
        while True:
            result = check()
            if result if isinstance(result, bool) else await result:
                return
            await trio.sleep(0.01)
