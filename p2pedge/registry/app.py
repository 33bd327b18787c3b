"""The registry's HTTP API as a small hand-written ASGI app over a :class:`Store`.

Read endpoints are public (every manifest is signed, every blob content-addressed, so
clients verify instead of trusting the server); writes need the bearer token. Errors are
JSON ``{"error": ...}`` with a 4xx status; anything a client names (model name, version,
digest, range) is validated before it touches the filesystem.

* ``GET /models``, ``GET /models/{name}``, ``GET /models/{name}/versions``
* ``GET /models/{name}/{version}`` - the signed manifest (``latest`` resolves)
* ``GET|HEAD /blobs/sha256-{hex}`` - with single ``Range: bytes=a-b`` support (206/416)
* ``PUT /blobs/sha256-{hex}`` - upload; the body must hash to the name
* ``PUT|POST /models/{name}/{version}`` - publish a manifest whose blobs are all present

Publishing rules: a stored ``name@version`` is immutable (a different manifest for it is
refused, whoever signs it; the same bytes again are a no-op), ``latest`` is not a version
(it would shadow every newer one), and a name belongs to its first publisher's key plus any
key the operator grants (:mod:`p2pedge.registry.owners`). Uploads are bounded in size, in
concurrency per client address and in time: a body must keep arriving (``read_idle_s``) and
average at least ``min_rate`` after a grace period, so a slow-loris cannot hold a task.
"""

from __future__ import annotations

import hmac
import json
import re
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from p2pedge.asgi import serve_lifespan
from p2pedge.errors import Busy, IntegrityError, ModelNotCached
from p2pedge.ids import ModelId
from p2pedge.models.keys import TrustStore, verify_signature
from p2pedge.models.manifest import MAX_MANIFEST_BYTES, Manifest, ManifestError, parse_manifest
from p2pedge.models.store import Store, StoreFull
from p2pedge.quota import Limit, Quota
from p2pedge.registry.owners import Grants, Owners

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

_DIGEST = re.compile(r"^sha256-([0-9a-f]{64})$")
_RANGE = re.compile(r"^bytes=(\d{0,19})-(\d{0,19})$")  # int() of 5000 digits raises
SEND_PIECE = 1 << 20
MAX_BLOB_BYTES = 64 * 1024**3
RESERVED_VERSIONS = frozenset({"latest"})


@dataclass(frozen=True)
class RegistryLimits:
    """Bounds on what one client can make the registry hold (safe defaults)."""

    max_blob_bytes: int = MAX_BLOB_BYTES
    max_manifest_bytes: int = MAX_MANIFEST_BYTES
    header_s: float = 5.0  # a new or idle connection must finish its request head by then
    read_idle_s: float = 30.0  # longest wait for the next piece of a request body
    grace_s: float = 30.0  # before the minimum average rate applies
    min_rate: int = 64 * 1024  # bytes per second a body must average after the grace
    # request bodies being received at once; HTTP has no peer id, so both the peer and the
    # source account are the client's address
    uploads: Limit = field(default_factory=lambda: Limit(per_peer=4, per_source=4, total=32))

    def body_deadline(self, start: float, received: int) -> float:
        """When a body that began at ``start`` and has delivered ``received`` bytes is cut."""
        return start + self.grace_s + received / max(self.min_rate, 1)


def is_reserved_version(version: str) -> bool:
    return version.lower() in RESERVED_VERSIONS


class HttpError(Exception):
    def __init__(self, status: int, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.body = {"error": message, **extra}


def parse_range(header: str, size: int) -> tuple[int, int]:
    """``(start, end_exclusive)`` for one ``bytes=`` range; ``HttpError(416)`` otherwise."""
    match = _RANGE.match(header.strip())
    if match is None or match.group(1) == match.group(2) == "":
        raise HttpError(416, f"unsupported range {header!r}", size=size)
    first, last = match.group(1), match.group(2)
    if first == "":
        start, end = max(0, size - int(last)), size
    else:
        start = int(first)
        end = size if last == "" else min(size, int(last) + 1)
    if start >= size or end <= start:
        raise HttpError(416, f"range {header!r} not satisfiable for {size} bytes", size=size)
    return start, end


def _model_id(name: str, version: str = "latest") -> ModelId:
    try:
        return ModelId(name, version)
    except ValueError as exc:
        raise HttpError(400, str(exc)) from exc


def _digest(text: str) -> str:
    match = _DIGEST.match(text)
    if match is None:
        raise HttpError(400, "blob names look like sha256-<64 lowercase hex>")
    return match.group(1)


class RegistryApp:
    """ASGI application; ``token=None`` disables publishing over HTTP."""

    def __init__(
        self,
        store: Store,
        *,
        token: str | None = None,
        trust: TrustStore | None = None,
        grants: Grants | None = None,
        limits: RegistryLimits = RegistryLimits(),
    ):
        self.store = store
        self.token = token
        self.trust = trust
        self.limits = limits
        self.owners = Owners(store.root, grants)
        self.uploads = Quota("registry.uploads", limits.uploads)
        self._publishing = trio.Lock()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await serve_lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        # a refused upload may leave its body unread: close rather than reuse the connection
        close = scope.get("method") in ("PUT", "POST")
        try:
            await self._route(scope, receive, send)
        except HttpError as exc:
            await self._json(send, exc.status, exc.body, close=close)
        except ModelNotCached as exc:
            await self._json(send, 404, {"error": str(exc)}, close=close)
        except StoreFull as exc:
            await self._json(send, 507, {"error": str(exc)}, close=close)
        except Busy as exc:
            body = {"error": str(exc), "limit": exc.limit, "scope": exc.scope}
            await self._json(send, 503, body, close=close)

    async def _route(self, scope: Scope, receive: Receive, send: Send) -> None:
        method: str = scope["method"]
        parts = [p for p in scope["path"].split("/") if p]
        if not parts or parts[0] not in ("models", "blobs"):
            raise HttpError(404, f"no such endpoint {scope['path']!r}")
        if parts[0] == "blobs":
            if len(parts) != 2:
                raise HttpError(404, "use /blobs/sha256-<hex>")
            digest = _digest(parts[1])
            if method in ("GET", "HEAD"):
                await self._get_blob(scope, send, digest, head=method == "HEAD")
            elif method == "PUT":
                self._authorize(scope)
                with self.uploads.hold(_client(scope), _client(scope)):
                    await self._put_blob(scope, receive, send, digest)
            else:
                raise HttpError(405, f"{method} not allowed on blobs")
            return
        if method in ("PUT", "POST") and len(parts) == 3:
            self._authorize(scope)
            model = _model_id(parts[1], parts[2])
            with self.uploads.hold(_client(scope), _client(scope)):
                await self._put_manifest(scope, receive, send, model)
            return
        if method != "GET":
            raise HttpError(405, f"{method} not allowed here")
        if len(parts) == 1:
            models = [self._summary(name) for name in self.store.names()]
            await self._json(send, 200, {"models": models})
        elif len(parts) == 2:
            await self._json(send, 200, self._summary(_model_id(parts[1]).name))
        elif len(parts) == 3 and parts[2] == "versions":
            name = _model_id(parts[1]).name
            await self._json(send, 200, {"name": name, "versions": self._versions(name)})
        elif len(parts) == 3:
            model = _model_id(parts[1], parts[2])
            if model.version == "latest":
                model = ModelId(model.name, self._versions(model.name)[-1])
            data = await trio.to_thread.run_sync(self.store.manifest_bytes, model)
            await self._respond(send, 200, data, {"content-type": "application/json"})
        else:
            raise HttpError(404, f"no such endpoint {scope['path']!r}")

    def _versions(self, name: str) -> list[str]:
        """Stored versions, oldest first; one literally named ``latest`` is never listed."""
        versions = [v for v in self.store.versions(name) if not is_reserved_version(v)]
        if not versions:
            raise HttpError(404, f"unknown model {name!r}")
        return versions

    def _summary(self, name: str) -> dict[str, Any]:
        versions = self._versions(name)
        latest = self.store.describe(ModelId(name, versions[-1]))
        return {"name": name, "versions": versions, "latest": latest}

    def _authorize(self, scope: Scope) -> None:
        if self.token is None:
            raise HttpError(403, "publishing is disabled on this registry (no token set)")
        headers = dict(scope.get("headers") or [])
        given = headers.get(b"authorization", b"").decode("latin-1")
        if not hmac.compare_digest(given.encode(), f"Bearer {self.token}".encode()):
            raise HttpError(401, "missing or wrong bearer token")

    async def _get_blob(self, scope: Scope, send: Send, digest: str, *, head: bool) -> None:
        if not self.store.has_blob(digest):
            raise HttpError(404, f"unknown blob sha256-{digest}")
        try:
            path = await trio.to_thread.run_sync(self.store.verify_blob, digest)
        except IntegrityError as exc:
            raise HttpError(404, f"blob sha256-{digest} was corrupt and is gone") from exc
        size = path.stat().st_size
        headers = dict(scope.get("headers") or [])
        range_header = headers.get(b"range")
        status, start, end = 200, 0, size
        extra = {"accept-ranges": "bytes", "content-type": "application/octet-stream"}
        if range_header is not None:
            start, end = parse_range(range_header.decode("latin-1"), size)
            status = 206
            extra["content-range"] = f"bytes {start}-{end - 1}/{size}"
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": _headers({**extra, "content-length": str(end - start)}),
            }
        )
        if head:
            await send({"type": "http.response.body", "body": b""})
            return
        offset = start
        while offset < end:
            length = min(SEND_PIECE, end - offset)
            piece = await trio.to_thread.run_sync(self.store.read_range, digest, offset, length)
            if len(piece) != length:
                raise HttpError(500, "blob shrank while being served")
            offset += length
            await send({"type": "http.response.body", "body": piece, "more_body": offset < end})
        if start == end:
            await send({"type": "http.response.body", "body": b""})

    async def _put_blob(self, scope: Scope, receive: Receive, send: Send, digest: str) -> None:
        limit = self.limits.max_blob_bytes
        declared = _content_length(scope, limit)
        if self.store.has_blob(digest):
            await self._drain(receive, limit)
            await self._json(send, 200, {"digest": digest, "stored": False})
            return
        if declared is not None:
            await trio.to_thread.run_sync(self.store.ensure_room, declared)
        spool_dir = str(self.store.partial)
        with tempfile.SpooledTemporaryFile(max_size=8 << 20, mode="w+b", dir=spool_dir) as spool:
            total = 0
            async for body in self._body(receive, limit):
                total += len(body)
                await trio.to_thread.run_sync(spool.write, body)
            spool.seek(0)
            await trio.to_thread.run_sync(self.store.ensure_room, total)
            try:
                await trio.to_thread.run_sync(self.store.write_blob_from, digest, spool)
            except IntegrityError as exc:
                raise HttpError(400, str(exc)) from exc
        await self._json(send, 201, {"digest": digest, "stored": True})

    async def _put_manifest(
        self, scope: Scope, receive: Receive, send: Send, model: ModelId
    ) -> None:
        if is_reserved_version(model.version):
            raise HttpError(400, f"{model.version!r} is not a version: it names the newest one")
        _content_length(scope, self.limits.max_manifest_bytes)
        data = await self._drain(receive, self.limits.max_manifest_bytes)

        def checked() -> Manifest:  # up to 8 MiB of JSON and a signature: off the loop
            manifest = parse_manifest(data)
            if self.trust is not None:
                manifest.verify(self.trust)
            else:
                verify_signature(manifest.publisher, manifest.signature, manifest.signed_bytes())
            return manifest

        try:
            manifest = await trio.to_thread.run_sync(checked)
        except ManifestError as exc:
            raise HttpError(400, str(exc)) from exc
        except IntegrityError as exc:
            raise HttpError(403, str(exc)) from exc
        except RecursionError as exc:  # json.loads on deeply nested arrays (found by fuzzing)
            raise HttpError(400, "manifest nests too deeply") from exc
        if manifest.model != model:
            raise HttpError(400, f"manifest is for {manifest.model}, not {model}")
        async with self._publishing:  # check-then-write must not interleave with another
            if model.version in self.store.versions(model.name):
                stored = await trio.to_thread.run_sync(self.store.manifest_bytes, model)
                if stored == manifest.to_bytes():
                    await self._json(send, 200, {"model": str(model), "stored": False})
                    return
                raise HttpError(409, f"{model} is already published; versions are immutable")
            await trio.to_thread.run_sync(self._check_owner, model.name, manifest.publisher)
            missing = sorted(
                {f.sha256 for f in manifest.files if not self.store.has_blob(f.sha256)}
            )
            if missing:
                raise HttpError(409, "upload these blobs first", missing=missing)
            await trio.to_thread.run_sync(self.store.put_manifest, manifest)
            await trio.to_thread.run_sync(self.owners.claim, model.name, manifest.publisher)
        await self._json(send, 201, {"model": str(model), "stored": True})

    def _check_owner(self, name: str, publisher: str) -> None:
        legacy: set[str] = set()
        if self.owners.owner(name) is None:
            for version in self.store.versions(name):
                legacy.add(
                    parse_manifest(self.store.manifest_bytes(ModelId(name, version))).publisher
                )
        allowed = self.owners.allowed(name, legacy)
        if allowed is not None and publisher.lower() not in allowed:
            raise HttpError(
                403,
                f"{name!r} belongs to another publisher key; the operator can grant yours",
                publisher=publisher,
            )

    async def _body(self, receive: Receive, limit: int) -> AsyncIterator[bytes]:
        """The pieces of a request body, cut at ``limit`` bytes or when it comes too slowly."""
        start = trio.current_time()
        total = 0
        more = True
        while more:
            idle = trio.current_time() + self.limits.read_idle_s
            message: dict[str, Any] | None = None
            with trio.move_on_at(min(idle, self.limits.body_deadline(start, total))):
                message = await receive()
            if message is None:
                raise HttpError(408, f"request body too slow ({total} bytes received)")
            if message["type"] != "http.request":
                raise HttpError(400, "the client went away before the body ended")
            body: bytes = message.get("body", b"")
            total += len(body)
            if total > limit:
                raise HttpError(413, f"body larger than {limit} bytes")
            more = bool(message.get("more_body", False))
            yield body

    async def _drain(self, receive: Receive, limit: int) -> bytes:
        return b"".join([piece async for piece in self._body(receive, limit)])

    @staticmethod
    async def _json(send: Send, status: int, body: object, *, close: bool = False) -> None:
        data = json.dumps(body, sort_keys=True).encode()
        headers = {"content-type": "application/json"}
        if close:
            headers["connection"] = "close"
        await RegistryApp._respond(send, status, data, headers)

    @staticmethod
    async def _respond(send: Send, status: int, data: bytes, headers: dict[str, str]) -> None:
        headers = {**headers, "content-length": str(len(data))}
        await send({"type": "http.response.start", "status": status, "headers": _headers(headers)})
        await send({"type": "http.response.body", "body": data})


def _client(scope: Scope) -> str:
    """The client's address: uploads are counted per address, whatever token it holds."""
    client = scope.get("client")
    return str(client[0]) if client else "unknown"


def _content_length(scope: Scope, limit: int) -> int | None:
    """The declared body size, refused up front (413) when over ``limit``."""
    raw = dict(scope.get("headers") or []).get(b"content-length")
    if raw is None:
        return None
    text = raw.decode("latin-1").strip()
    if not text.isdigit() or len(text) > 20:
        raise HttpError(400, "bad content-length")
    if int(text) > limit:
        raise HttpError(413, f"body of {text} bytes is larger than {limit}")
    return int(text)


def _headers(headers: dict[str, str]) -> list[tuple[bytes, bytes]]:
    return [(k.encode(), v.encode()) for k, v in headers.items()]
