"""The OpenAI-compatible HTTP API as a plain ASGI callable (no framework).

Five routes do not need a framework, and a plain callable under hypercorn's trio worker
adds no dependency and keeps full control of the two things that matter here: reading a
body with a cap before parsing it, and noticing ``http.disconnect`` while a generation
streams (a watcher task cancels the generation, so it stops within the token being
computed). Routes: ``GET /v1/models``, ``GET /v1/models/{id}``,
``POST /v1/chat/completions``, ``POST /v1/completions``, ``POST /v1/embeddings``,
``GET /metrics``, and the swarm page: ``GET /`` (with ``/swarm.js``) and the JSON it
polls, ``GET /v1/swarm``.

A streamed response starts only once the first token exists, so every refusal that comes
before compute (unknown model, prompt too long, a full queue) is a proper HTTP status
rather than an error inside a 200 stream.
"""

from __future__ import annotations

import hmac
import json
import logging
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from contextlib import aclosing
from typing import Any, cast

import trio

from p2pedge.api.backend import ApiBackend, Piece, Target, Usage
from p2pedge.api.embeddings import embeddings
from p2pedge.api.logprobs import Logprobs
from p2pedge.api.metrics import CONTENT_TYPE, ApiMetrics
from p2pedge.api.respond import (
    SSE_HEADERS,
    Send,
    Sender,
    as_api_error,
    new_shape,
    route_headers,
)
from p2pedge.api.schema import (
    LOCAL_LOGPROBS,
    ApiError,
    ApiLimits,
    EmbeddingRequest,
    GenerationRequest,
    bad,
    model_json,
    not_found,
    parse_chat,
    parse_completion,
    parse_embeddings,
    too_large,
)
from p2pedge.api.sse import DONE, Shape, event
from p2pedge.api.swarm import STATIC, LiveStreams, asset
from p2pedge.asgi import serve_lifespan
from p2pedge.errors import Busy, P2PEdgeError
from p2pedge.quota import Quota

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
log = logging.getLogger("p2pedge.api")
ROUTE_HEADERS = ("x-p2pedge-route", "x-p2pedge-peer", "x-p2pedge-specialist", "x-p2pedge-model")
REFUSALS = frozenset({401, 408, 413, 429, 503})
RETRY_S = 0.5  # a request waiting for a full node's queue also retries this often


class _Gone(Exception):
    """The client disconnected before its request body ended."""


class ApiApp:
    """ASGI app over an :class:`ApiBackend`; ``key`` set requires ``Bearer <key>``."""

    def __init__(
        self,
        backend: ApiBackend,
        *,
        key: str | None = None,
        cors_origins: Sequence[str] = (),
        limits: ApiLimits | None = None,
    ) -> None:
        self.backend = backend
        self.key = key
        self.cors_origins = frozenset(cors_origins)
        self.limits = limits or ApiLimits()
        self.metrics = ApiMetrics(backend.stats)
        self.requests = Quota("api.requests", self.limits.requests)
        self._freed = trio.Event()  # set (and replaced) whenever a generation here ends
        self.live = LiveStreams()  # generations streaming now, for the swarm page

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await serve_lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        headers = {k.lower(): v.decode("latin-1") for k, v in scope.get("headers") or []}
        cors = self._cors(headers.get(b"origin"))
        out = Sender(send)
        endpoint = scope["path"] if scope["path"] in _ENDPOINTS else "other"
        status = 200
        try:
            if scope["method"] == "OPTIONS":
                status = await self._preflight(out, headers, cors)
            else:
                await self._route(scope, headers, receive, out, cors)
        except _Gone:
            status = 499
        except ApiError as exc:
            status = exc.status
            if exc.status in REFUSALS:
                self.metrics.refusals.labels(exc.code or str(exc.status)).inc()
            if out.started:
                # mid-stream: the error as a last event (OpenAI's clients raise it), then
                # a clean end of the response rather than a cut connection
                log.warning("API error after the response started: %s", exc.message)
                if not out.ended:
                    await out.body(event(exc.body()) + DONE)
            else:
                data = json.dumps(exc.body()).encode()
                extra = {"content-type": "application/json", **exc.headers, **cors}
                if scope["method"] == "POST" and exc.status in (408, 413):
                    extra["connection"] = "close"  # the rest of the body was not read
                await out.whole(exc.status, data, extra)
        finally:
            self.metrics.requests.labels(endpoint, str(status)).inc()

    # -- access ------------------------------------------------------------------------

    def _cors(self, origin: str | None) -> dict[str, str]:
        if origin is None or not self.cors_origins:
            return {}
        if "*" in self.cors_origins:
            allowed = "*"
        elif origin in self.cors_origins:
            allowed = origin
        else:
            return {}
        return {
            "access-control-allow-origin": allowed,
            "access-control-expose-headers": ", ".join(ROUTE_HEADERS),
            "vary": "origin",
        }

    async def _preflight(self, out: Sender, headers: dict[bytes, str], cors: dict[str, str]) -> int:
        if not cors:
            raise ApiError(403, "this origin is not allowed (see the API's CORS origins)")
        asked = headers.get(b"access-control-request-headers", "authorization, content-type")
        await out.whole(
            204,
            b"",
            {
                **cors,
                "access-control-allow-methods": "GET, POST, OPTIONS",
                "access-control-allow-headers": asked[:1024],
                "access-control-max-age": "600",
            },
        )
        return 204

    def _authorize(self, headers: dict[bytes, str]) -> None:
        if self.key is None:
            return
        given = headers.get(b"authorization", "").encode("latin-1")
        if not hmac.compare_digest(given, f"Bearer {self.key}".encode()):
            raise ApiError(
                401, "missing or wrong API key (Authorization: Bearer ...)", code="invalid_api_key"
            )

    # -- routing -----------------------------------------------------------------------

    async def _route(
        self,
        scope: Scope,
        headers: dict[bytes, str],
        receive: Receive,
        out: Sender,
        cors: dict[str, str],
    ) -> None:
        path, method = scope["path"], scope["method"]
        posts: dict[str, Callable[[bytes, ApiLimits], GenerationRequest | EmbeddingRequest]]
        posts = {
            "/v1/chat/completions": parse_chat,
            "/v1/completions": parse_completion,
            "/v1/embeddings": parse_embeddings,
        }
        gets = path in _GETS or path.startswith("/v1/models/")
        if path not in posts and not gets:
            raise ApiError(404, f"no such endpoint {path!r}", code="unknown_url")
        if (method != "POST") if path in posts else (method not in ("GET", "HEAD")):
            raise ApiError(405, f"{method} is not allowed on {path}", code="method_not_allowed")
        if path in STATIC:  # the swarm page holds no data: its script fetches /v1/swarm
            await out.whole(200, *asset(path))
            return
        self._authorize(headers)
        if path == "/v1/swarm":
            view = {**await self.backend.swarm(), "sessions": self.live.rows()}
            await self._json(out, view, cors)
        elif path == "/metrics":
            data = self.metrics.render()
            await out.whole(200, data, {"content-type": CONTENT_TYPE, **cors})
        elif path == "/v1/models":
            listing = [model_json(e.id, e.where, e.detail) for e in await self.backend.models()]
            await self._json(out, {"object": "list", "data": listing}, cors)
        elif gets:
            name = path[len("/v1/models/") :]
            found = [e for e in await self.backend.models() if e.id == name]
            if not found:
                raise not_found(name)
            await self._json(out, model_json(name, found[0].where, found[0].detail), cors)
        else:
            body = await self._read_body(scope, headers, receive)
            request = posts[path](body, self.limits)
            if isinstance(request, EmbeddingRequest):
                await self._embeddings(scope, out, request, cors)
            else:
                await self._generate(scope, receive, out, request, cors)

    async def _json(self, out: Sender, body: object, cors: dict[str, str]) -> None:
        await out.whole(
            200, json.dumps(body).encode(), {"content-type": "application/json", **cors}
        )

    async def _read_body(self, scope: Scope, headers: dict[bytes, str], receive: Receive) -> bytes:
        """The request body, refused (413) past ``max_body_bytes`` before it is parsed."""
        limit = self.limits.max_body_bytes
        declared = headers.get(b"content-length")
        if declared is not None:
            if not declared.strip().isdigit() or len(declared) > 20:
                raise bad("bad content-length")
            if int(declared) > limit:
                raise too_large(limit)
        pieces: list[bytes] = []
        total = 0
        more = True
        deadline = trio.current_time() + self.limits.body_s
        while more:
            message: dict[str, Any] | None = None
            with trio.move_on_at(min(deadline, trio.current_time() + self.limits.read_idle_s)):
                message = await receive()
            if message is None:
                raise ApiError(408, "the request body came too slowly", code="timeout")
            if message["type"] == "http.disconnect":
                raise _Gone()
            piece: bytes = message.get("body", b"")
            total += len(piece)
            if total > limit:
                raise too_large(limit)
            pieces.append(piece)
            more = bool(message.get("more_body", False))
        return b"".join(pieces)

    # -- embeddings --------------------------------------------------------------------

    async def _embeddings(
        self, scope: Scope, out: Sender, request: EmbeddingRequest, cors: dict[str, str]
    ) -> None:
        """A full queue is refused at once, without the wait a generation gets: the
        request is one short batch, and the client's retry is as good."""
        client = _client(scope)
        try:
            grant = self.requests.acquire(client, client)
        except Busy as exc:
            raise cast(ApiError, as_api_error(exc, self.limits)) from None
        try:
            body = await embeddings(self.backend, request)
        except (P2PEdgeError, ValueError) as exc:
            raise cast(ApiError, as_api_error(exc, self.limits)) from None
        finally:
            self.requests.release(grant)
        await self._json(out, body, cors)

    # -- generation --------------------------------------------------------------------

    async def _generate(
        self,
        scope: Scope,
        receive: Receive,
        out: Sender,
        request: GenerationRequest,
        cors: dict[str, str],
    ) -> None:
        client = _client(scope)
        try:
            grant = self.requests.acquire(client, client)
        except Busy as exc:
            raise cast(ApiError, as_api_error(exc, self.limits)) from None
        error: ApiError | None = None
        try:
            target = await self.backend.target(request.model)
            if target is None:
                raise not_found(request.model)
            if request.params.logprobs and target.where != "local":
                raise bad(f"{LOCAL_LOGPROBS}; {request.model} runs {target.where}", "logprobs")
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._watch, receive, nursery.cancel_scope)
                try:
                    if target.where in ("local", "sharded"):
                        await self._tokens(out, request, target, cors)
                    else:
                        await self._routed(out, request, target, cors)
                except Exception as exc:
                    error = as_api_error(exc, self.limits)
                    if error is None:
                        raise
                finally:
                    nursery.cancel_scope.cancel()
        finally:
            self.requests.release(grant)
        if error is not None:
            raise error

    async def _watch(self, receive: Receive, scope: trio.CancelScope) -> None:
        """Cancel the generation when the client goes away (``http.disconnect``)."""
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                self.metrics.disconnects.inc()
                scope.cancel()
                return

    async def _tokens(
        self, out: Sender, request: GenerationRequest, target: Target, cors: dict[str, str]
    ) -> None:
        m = self.metrics
        if target.warm is not None:
            m.cache.labels("hit" if target.warm else "miss").inc()
        shape = new_shape(request)
        lp = Logprobs(request.kind, request.params.logprobs)
        usage = Usage() if request.include_usage or not request.stream else None
        start = time.perf_counter()
        tokens = m.tokens.labels(target.where)
        per_token = m.per_token.labels(target.where)
        m.waiting.inc()
        try:
            pieces, first = await self._first(target, request, usage)
        finally:
            m.waiting.dec()
        async with aclosing(pieces):
            m.active.inc()
            live = self.live.open(request.model, target.where)
            try:
                last = time.perf_counter()
                m.ttft.labels(target.where).observe(last - start)
                count = 0 if first is None else 1
                tokens.inc(count)
                if first is not None:
                    live.token()
                headers = {"x-p2pedge-route": target.where, **cors}
                # a chat stream's role event goes out with the first token's, in one write
                lead = shape.chunk("", role=True) if shape.kind == "chat" else b""
                if request.stream:
                    await out.start(200, {**SSE_HEADERS, **headers})
                    if first is None or not first.text:
                        await out.body(lead, True)
                text: list[str] = []
                if first is not None:
                    lp.add(first)
                    if first.text:
                        await self._emit(out, shape, request, text, first.text, lp, lead)
                async for piece in pieces:
                    now = time.perf_counter()
                    per_token.observe(now - last)
                    last = now
                    count += 1
                    live.token()
                    tokens.inc()
                    lp.add(piece)
                    if piece.text:
                        await self._emit(out, shape, request, text, piece.text, lp)
            finally:
                m.active.dec()
                self.live.close(live)
                self._freed.set()  # wake requests waiting for a queue slot
                self._freed = trio.Event()
        finish = "length" if count >= request.params.max_tokens else "stop"
        prompt_tokens = usage.prompt_tokens if usage is not None else 0
        if request.stream:
            tail = shape.chunk("", finish, logprobs=lp.take())
            if request.include_usage:
                tail += shape.usage_chunk(prompt_tokens, count)
            await out.body(tail + DONE)
        else:
            body = shape.whole("".join(text), finish, prompt_tokens, count, lp.take())
            await out.whole(
                200, json.dumps(body).encode(), {"content-type": "application/json", **headers}
            )

    async def _first(
        self, target: Target, request: GenerationRequest, usage: Usage | None
    ) -> tuple[AsyncGenerator[Piece, None], Piece | None]:
        """The stream and its first piece. A full node (``Busy`` for everyone, scope
        ``total``) is waited out for up to ``queue_wait_s``, retrying whenever a generation
        here ends (and every ``RETRY_S``, for slots freed by peers' requests)."""
        deadline = trio.current_time() + self.limits.queue_wait_s
        while True:
            pieces = cast(AsyncGenerator[Piece, None], self.backend.stream(target, request, usage))
            try:
                return pieces, await anext(pieces)
            except StopAsyncIteration:
                return pieces, None
            except Busy as exc:  # raised inside the generator, which is finished now
                if exc.scope != "total" or trio.current_time() >= deadline:
                    raise
            with trio.move_on_at(min(deadline, trio.current_time() + RETRY_S)):
                await self._freed.wait()

    @staticmethod
    async def _emit(
        out: Sender,
        shape: Shape,
        request: GenerationRequest,
        text: list[str],
        piece: str,
        lp: Logprobs,
        lead: bytes = b"",
    ) -> None:
        if request.stream:
            await out.body(lead + shape.chunk(piece, logprobs=lp.take()), True)
        else:
            text.append(piece)

    async def _routed(
        self, out: Sender, request: GenerationRequest, target: Target, cors: dict[str, str]
    ) -> None:
        """``auto``, specialists and whole models on a peer: the orchestrator answers whole."""
        m = self.metrics
        start = time.perf_counter()
        m.active.inc()
        try:
            answer = await self.backend.ask(target, request)
        finally:
            m.active.dec()
        m.ttft.labels(answer.where).observe(time.perf_counter() - start)
        m.tokens.labels(answer.where).inc(answer.completion_tokens)
        shape = new_shape(request, answer.model if target.where == "auto" else request.model)
        headers = {**route_headers(answer), **cors}
        if request.stream:
            await out.start(200, {**SSE_HEADERS, **headers})
            data = shape.chunk("", role=True) if shape.kind == "chat" else b""
            data += shape.chunk(answer.text) + shape.chunk("", answer.finish_reason)
            if request.include_usage:
                data += shape.usage_chunk(answer.prompt_tokens, answer.completion_tokens)
            await out.body(data + DONE)
        else:
            body = shape.whole(
                answer.text, answer.finish_reason, answer.prompt_tokens, answer.completion_tokens
            )
            await out.whole(
                200, json.dumps(body).encode(), {"content-type": "application/json", **headers}
            )


_GETS = frozenset({*STATIC, "/metrics", "/v1/models", "/v1/swarm"})
_ENDPOINTS = _GETS | {"/v1/chat/completions", "/v1/completions", "/v1/embeddings"}


def _client(scope: Scope) -> str:
    client = scope.get("client")
    return str(client[0]) if client else "unknown"
