"""Adapters between the orchestrator and a Node: peers over the infer protocol, and the
infer protocol's server backed by local inference."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from p2pedge.errors import ModelNotCached
from p2pedge.orchestrator.interfaces import CardLike, LocalInferenceLike
from p2pedge.protocols._stream import FramedStream
from p2pedge.protocols.infer.codec import PROTOCOL_ID, InferLimits, InferRequest, InferResult
from p2pedge.protocols.infer.handler import InferServer, OnPiece, StreamHandler, request_completion


class NodeLike(Protocol):
    """The Node methods used here (``p2pedge.node.Node`` fits)."""

    @property
    def peer_id(self) -> str: ...

    async def find_peers(self, model: str | None = None) -> Sequence[Any]: ...

    async def open_stream(
        self, peer_id: str, protocol_id: str, *, timeout: float = 10.0
    ) -> FramedStream: ...

    def set_stream_handler(self, protocol_id: str, handler: StreamHandler) -> None: ...


class NodePeers:
    """``PeerDirectoryLike`` over a Node: other peers' cards, requests over infer/1.0.0."""

    def __init__(self, node: NodeLike, *, dial_timeout_s: float = 10.0) -> None:
        self.node = node
        self.dial_timeout_s = dial_timeout_s

    async def find_peers(self, model: str | None = None) -> list[CardLike]:
        cards = await self.node.find_peers(model)
        return [c for c in cards if c.peer_id != self.node.peer_id]

    async def run_remote(
        self, peer_id: str, request: InferRequest, *, timeout_s: float
    ) -> InferResult:
        stream = await self.node.open_stream(peer_id, PROTOCOL_ID, timeout=self.dial_timeout_s)
        return await request_completion(stream, request, timeout_s=timeout_s)


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
        return InferResult(
            done.text, done.prompt_tokens, done.completion_tokens, done.ttft_s, done.tok_per_s,
            done.finish_reason, provider,
        )  # fmt: skip


def install_infer(
    node: NodeLike, local: LocalInferenceLike, *, limits: InferLimits | None = None
) -> InferServer:
    """Serve ``/p2pedge/infer/1.0.0`` on ``node`` from ``local`` within ``limits``
    (queue slots per peer, per source address and in total); returns the server."""
    server = InferServer(LocalBackend(local, node.peer_id[:12]), limits=limits)
    node.set_stream_handler(PROTOCOL_ID, server.handle)
    return server
