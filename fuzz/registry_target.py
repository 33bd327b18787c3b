"""The registry's HTTP request handling as a fuzz target: the ASGI app, driven in process.

Each input is a msgpack map ``{"m": method, "p": path, "h": [[name, value]], "b": body}``
turned into the scope, body messages and disconnect that hypercorn would hand the app. A
crash is an exception escaping the app, a 5xx other than 503/507, anything but exactly one
response, or an upload slot still held afterwards.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgpack

from fuzz.mutators import Sample
from fuzz.targets import Harness, _key, _pack, _tiny_model_dir


def _latin(text: str) -> bytes:
    """Header bytes as hypercorn hands them to the app (HTTP headers are bytes)."""
    return text.encode("latin-1", "replace")


def registry_requests(scratch: Path) -> Harness:
    import trio

    from p2pedge.ids import ModelId
    from p2pedge.models.manifest import build_manifest
    from p2pedge.models.store import Store
    from p2pedge.registry.app import RegistryApp, RegistryLimits

    store = Store(scratch / "registry")
    key = _key()
    store.add_model_dir(_tiny_model_dir(scratch), "tiny", "1", "llm", key, chunk_size=1024)
    newer = build_manifest(
        _tiny_model_dir(scratch), ModelId("tiny", "2"), "llm", key, chunk_size=1024
    )
    limits = RegistryLimits(max_blob_bytes=1 << 16, max_manifest_bytes=1 << 16, read_idle_s=1.0)
    app = RegistryApp(store, token="t", limits=limits)
    digest = newer.files[0].sha256
    blob = (scratch / "model" / newer.files[0].path).read_bytes()

    async def acheck(data: bytes) -> None:
        try:
            request = msgpack.unpackb(data, raw=False, strict_map_key=False)
        except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError):
            return  # not a request we can express over HTTP; hypercorn parses the real ones
        if not isinstance(request, dict):
            return  # not an HTTP request at all; the server never sees such a thing
        method, path, headers, body = (request.get(k) for k in ("m", "p", "h", "b"))
        if not (isinstance(method, str) and isinstance(path, str) and isinstance(body, bytes)):
            return
        if not isinstance(headers, list) or not all(
            isinstance(h, list) and len(h) == 2 and all(isinstance(x, str) for x in h)
            for h in headers
        ):
            return
        pieces = [body[i : i + 1000] for i in range(0, len(body), 1000)] or [b""]
        scope = {
            "type": "http",
            "method": method.upper()[:16],
            "path": path,
            "headers": [(_latin(k.lower()), _latin(v)) for k, v in headers],
            "client": ("127.0.0.1", 5000),
        }  # fmt: skip
        sent: list[dict[str, Any]] = []

        async def receive() -> dict[str, Any]:
            if pieces:
                piece = pieces.pop(0)
                return {"type": "http.request", "body": piece, "more_body": bool(pieces)}
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        with trio.fail_after(5):
            await app(scope, receive, send)
        starts = [m for m in sent if m["type"] == "http.response.start"]
        assert len(starts) == 1, f"{len(starts)} responses"
        assert starts[0]["status"] < 500 or starts[0]["status"] in (503, 507), starts[0]
        assert app.uploads.held() == 0, "an upload slot leaked"

    auth, size = [["authorization", "Bearer t"]], str(len(blob))
    blob_path = f"/blobs/sha256-{digest}"
    requests = [
        {"m": "GET", "p": "/models", "h": [], "b": b""},
        {"m": "GET", "p": "/models/tiny/latest", "h": [], "b": b""},
        {"m": "GET", "p": "/models/tiny/versions", "h": [], "b": b""},
        {"m": "GET", "p": f"/blobs/sha256-{digest}", "h": [["range", "bytes=10-99"]], "b": b""},
        {"m": "HEAD", "p": f"/blobs/sha256-{digest}", "h": [], "b": b""},
        {"m": "PUT", "p": blob_path, "h": [*auth, ["content-length", size]], "b": blob},
        {"m": "PUT", "p": "/models/tiny/2", "h": auth, "b": newer.to_bytes()},
        {"m": "POST", "p": "/models/tiny/1", "h": auth, "b": newer.to_bytes()},
    ]  # fmt: skip
    samples = [Sample(_pack(r), "msgpack") for r in requests]
    return Harness(samples, (), acheck=acheck)  # every refusal must be an HTTP answer
