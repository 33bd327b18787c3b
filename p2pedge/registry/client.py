"""HTTP client for the registry; it is also a chunk and manifest source for pulls.

Network failures become ``PeerUnavailable``, a 404 ``SourceMissing``, a malformed answer
``RemoteProtocolError``; bodies are read with a cap so a hostile server cannot make us
buffer more than one chunk.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx
import trio

from p2pedge.errors import LocalProtocolError, PeerUnavailable, RemoteProtocolError
from p2pedge.ids import ModelId
from p2pedge.models.manifest import MAX_MANIFEST_BYTES, Manifest
from p2pedge.models.sources import SourceMissing
from p2pedge.models.store import Store

UPLOAD_PIECE = 1 << 20


class RegistryClient:
    """``async with RegistryClient("http://host:8080") as registry: ...``"""

    def __init__(
        self,
        base_url: str,
        *,
        token: str | None = None,
        timeout: float = 30.0,
        max_connections: int = 16,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.name = f"registry {self.base_url}"
        headers = {"authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.AsyncClient(
            base_url=self.base_url,
            headers=headers,
            timeout=timeout,
            limits=httpx.Limits(max_connections=max_connections),
        )

    async def __aenter__(self) -> RegistryClient:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _get(self, path: str, limit: int, headers: dict[str, str] | None = None) -> bytes:
        try:
            async with self._http.stream("GET", path, headers=headers) as response:
                if response.status_code == 404:
                    raise SourceMissing(f"{self.name}: {path} not found")
                if response.status_code not in (200, 206):
                    raise self._status_error(response, await _head_of(response))
                body = bytearray()
                async for piece in response.aiter_bytes():
                    body += piece
                    if len(body) > limit:
                        raise RemoteProtocolError(f"{self.name}: {path} exceeds {limit} bytes")
                return bytes(body)
        except httpx.TransportError as exc:
            raise PeerUnavailable(f"{self.name}: {exc!r}") from exc

    def _status_error(self, response: httpx.Response, text: str = "") -> Exception:
        message = f"{self.name}: HTTP {response.status_code} {text}"
        if response.status_code >= 500:
            return PeerUnavailable(message)
        if response.status_code in (401, 403):
            return LocalProtocolError(message)
        return RemoteProtocolError(message)

    async def _json(self, path: str) -> Any:
        try:
            return json.loads(await self._get(path, MAX_MANIFEST_BYTES))
        except (ValueError, RecursionError) as exc:  # RecursionError: hostile deep nesting
            raise RemoteProtocolError(f"{self.name}: {path} is not JSON") from exc

    async def list_models(self) -> list[dict[str, Any]]:
        body = await self._json("/models")
        models = body.get("models") if isinstance(body, dict) else None
        if not isinstance(models, list):
            raise RemoteProtocolError(f"{self.name}: /models lacks a list")
        return models

    async def versions(self, name: str) -> list[str]:
        body = await self._json(f"/models/{ModelId(name).name}/versions")
        versions = body.get("versions") if isinstance(body, dict) else None
        if not isinstance(versions, list) or not all(isinstance(v, str) for v in versions):
            raise RemoteProtocolError(f"{self.name}: bad versions list")
        return versions

    async def fetch_manifest(self, model: ModelId) -> bytes:
        return await self._get(f"/models/{model.name}/{model.version}", MAX_MANIFEST_BYTES)

    async def fetch_chunk(self, digest: str, index: int, chunk_size: int) -> bytes:
        start = index * chunk_size
        headers = {"range": f"bytes={start}-{start + chunk_size - 1}"}
        return await self._get(f"/blobs/sha256-{digest}", chunk_size, headers)

    async def has_blob(self, digest: str) -> bool:
        try:
            response = await self._http.head(f"/blobs/sha256-{digest}")
        except httpx.TransportError as exc:
            raise PeerUnavailable(f"{self.name}: {exc!r}") from exc
        if response.status_code == 404:
            return False
        if response.status_code != 200:
            raise self._status_error(response)
        return True

    async def upload_blob(self, digest: str, path: Path) -> None:
        async def body() -> AsyncIterator[bytes]:
            with open(path, "rb") as handle:
                while piece := await trio.to_thread.run_sync(handle.read, UPLOAD_PIECE):
                    yield piece

        await self._send("PUT", f"/blobs/sha256-{digest}", body())

    async def publish_manifest(self, manifest: Manifest) -> None:
        model = manifest.model
        await self._send("PUT", f"/models/{model.name}/{model.version}", manifest.to_bytes())

    async def _send(self, method: str, path: str, content: Any) -> None:
        try:
            response = await self._http.request(method, path, content=content)
        except httpx.TransportError as exc:
            raise PeerUnavailable(f"{self.name}: {exc!r}") from exc
        if response.status_code not in (200, 201):
            raise self._status_error(response, response.text[:200])

    async def publish(self, store: Store, model: ModelId) -> Manifest:
        """Upload the blobs the registry lacks, then the manifest (which it checks)."""
        manifest = await trio.to_thread.run_sync(store.get_manifest, model)
        for digest in sorted({f.sha256 for f in manifest.files}):
            if not await self.has_blob(digest):
                path = await trio.to_thread.run_sync(store.verify_blob, digest)
                await self.upload_blob(digest, path)
        await self.publish_manifest(manifest)
        return manifest


async def _head_of(response: httpx.Response, limit: int = 1024) -> str:
    """The first bytes of an error body, for the message; the rest is never read."""
    head = bytearray()
    async for piece in response.aiter_bytes():
        head += piece
        if len(head) >= limit:
            break
    return head[:200].decode("utf-8", "replace")
