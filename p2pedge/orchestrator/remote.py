"""Adapters between the orchestrator and a node's network: peers over the infer
protocol, and the infer protocol's server backed by local inference.

The infer protocol's wire record (:class:`InferResult`) and the user-facing
:class:`~p2pedge.runtime.completion.Completion` convert into each other here only.
"""

from __future__ import annotations

from typing import Any

from p2pedge.errors import ModelNotCached
from p2pedge.orchestrator.interfaces import CardLike, LocalInferenceLike
from p2pedge.protocols.host import PeerFinder, StreamHost
from p2pedge.protocols.infer.codec import PROTOCOL_ID, InferLimits, InferRequest, InferResult
from p2pedge.protocols.infer.handler import InferServer, OnPiece, request_completion
from p2pedge.runtime.completion import Completion

NodeLike = PeerFinder  # the old name of the host protocol these adapters take


def from_wire(result: InferResult) -> Completion:
    """A peer's answer as a completion (a peer sends text, not token ids)."""
    return Completion(
        result.text, result.prompt_tokens, result.completion_tokens, result.ttft_s,
        result.tok_per_s, result.finish_reason, result.provider,
    )  # fmt: skip


def to_wire(done: Completion, provider: str) -> InferResult:
    return InferResult(
        done.text, done.prompt_tokens, done.completion_tokens, done.ttft_s, done.tok_per_s,
        done.finish_reason, provider,
    )  # fmt: skip


class NodePeers:
    """``PeerDirectoryLike`` over a node: other peers' cards, requests over infer/1.0.0."""

    def __init__(self, host: PeerFinder, *, dial_timeout_s: float = 10.0) -> None:
        self.host = host
        self.dial_timeout_s = dial_timeout_s

    async def find_peers(self, model: str | None = None) -> list[CardLike]:
        cards = await self.host.find_peers(model)
        return [c for c in cards if c.peer_id != self.host.peer_id]

    async def run_remote(
        self, peer_id: str, request: InferRequest, *, timeout_s: float
    ) -> Completion:
        stream = await self.host.open_stream(peer_id, PROTOCOL_ID, timeout=self.dial_timeout_s)
        return from_wire(await request_completion(stream, request, timeout_s=timeout_s))


class LocalBackend:
    """The infer server's backend: runs requests on this node's ``LocalInference``."""

    def __init__(self, local: LocalInferenceLike, provider_name: str = "") -> None:
        self.local = local
        self.provider_name = provider_name

    async def serves(self, model: str) -> bool:
        try:
            await self.local.resolve(model)
        except ModelNotCached:
            return False
        return True

    async def run(self, request: InferRequest, on_piece: OnPiece) -> InferResult:
        p = request.params
        kwargs: dict[str, Any] = {
            "max_tokens": p.max_tokens,
            "temperature": p.temperature,
            "top_p": p.top_p,
            "top_k": p.top_k,
            "seed": p.seed,
            "stop": list(p.stop) or None,
        }
        if request.messages is not None:
            done = await self.local.complete(request.model, messages=request.chat(), **kwargs)
        else:
            done = await self.local.complete(request.model, prompt=request.prompt, **kwargs)
        if done.text:
            await on_piece(done.text)
        provider = f"{self.provider_name}:{done.provider}" if self.provider_name else done.provider
        return to_wire(done, provider)


def install_infer(
    host: StreamHost, local: LocalInferenceLike, *, limits: InferLimits | None = None
) -> InferServer:
    """Serve ``/p2pedge/infer/1.0.0`` on ``host`` from ``local`` within ``limits``
    (queue slots per peer, per source address and in total); returns the server."""
    server = InferServer(LocalBackend(local, host.peer_id[:12]), limits=limits)
    host.set_stream_handler(PROTOCOL_ID, server.handle)
    return server
