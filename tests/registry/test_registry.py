"""The registry over real HTTP (hypercorn on an ephemeral port): reads, ranges, publishing."""

from __future__ import annotations

import hashlib
import os
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path

import httpx
import pytest
import trio

from p2pedge.errors import LocalProtocolError
from p2pedge.ids import ModelId
from p2pedge.models.keys import TrustStore, generate_key, public_key_hex, save_private_key
from p2pedge.models.manifest import Manifest
from p2pedge.models.pull import pull
from p2pedge.models.store import Store
from p2pedge.registry.__main__ import main as registry_main
from p2pedge.registry.client import RegistryClient
from p2pedge.registry.server import serve_registry

CHUNK = 4096
TOKEN = "s3cret"


def make_dir(root: Path, size: int = 5 * CHUNK + 3) -> Path:
    model = root / "src"
    model.mkdir()
    (model / "weights.bin").write_bytes(os.urandom(size))
    (model / "config.json").write_bytes(b'{"x": 1}')
    return model


@pytest.fixture
async def registry(tmp_path: Path, nursery: trio.Nursery) -> AsyncIterator[tuple[str, Store]]:
    root = tmp_path / "registry"
    store = Store(root)
    port = await nursery.start(partial(serve_registry, root, token=TOKEN))
    yield f"http://127.0.0.1:{port}", store


async def published(tmp_path: Path, store: Store) -> Manifest:
    return store.add_model_dir(
        make_dir(tmp_path), "tiny", "1", "llm", generate_key(), tags=["t"], chunk_size=CHUNK
    )


async def test_listing_and_manifest(tmp_path: Path, registry: tuple[str, Store]) -> None:
    url, store = registry
    manifest = await published(tmp_path, store)
    async with httpx.AsyncClient(base_url=url) as http:
        models = (await http.get("/models")).json()["models"]
        assert [m["name"] for m in models] == ["tiny"]
        assert models[0]["latest"]["tags"] == ["t"]
        assert (await http.get("/models/tiny/versions")).json()["versions"] == ["1"]
        assert (await http.get("/models/tiny")).json()["versions"] == ["1"]
        latest = await http.get("/models/tiny/latest")
        assert latest.status_code == 200 and latest.content == manifest.to_bytes()


async def test_ranges(tmp_path: Path, registry: tuple[str, Store]) -> None:
    url, store = registry
    manifest = await published(tmp_path, store)
    entry = manifest.file("weights.bin")
    data = store.blob_path(entry.sha256).read_bytes()
    path = f"/blobs/sha256-{entry.sha256}"
    async with httpx.AsyncClient(base_url=url) as http:
        whole = await http.get(path)
        assert whole.status_code == 200 and whole.content == data
        part = await http.get(path, headers={"range": "bytes=10-19"})
        assert part.status_code == 206 and part.content == data[10:20]
        assert part.headers["content-range"] == f"bytes 10-19/{len(data)}"
        tail = await http.get(path, headers={"range": "bytes=-5"})
        assert tail.content == data[-5:]
        open_end = await http.get(path, headers={"range": f"bytes={len(data) - 3}-"})
        assert open_end.content == data[-3:]
        for bad in (f"bytes={len(data)}-", "bytes=5-2", "items=0-1", "bytes=0-1,4-5"):
            response = await http.get(path, headers={"range": bad})
            assert response.status_code == 416, bad
            assert "error" in response.json()


@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("/blobs/sha256-xyz", 400),
        ("/blobs/" + "a" * 64, 400),
        (f"/blobs/sha256-{'0' * 64}", 404),
        ("/blobs/../../etc/passwd", 404),
        ("/models/..%2F..%2Fetc/passwd", 404),
        ("/models/%2E%2E/1", 400),
        ("/models/tiny/%2E%2E", 400),
        ("/models/nope", 404),
        ("/models/nope/versions", 404),
        ("/models/nope/1", 404),
        ("/models/Bad Name", 400),
        ("/elsewhere", 404),
    ],
)
async def test_bad_requests_get_json_4xx(
    tmp_path: Path, registry: tuple[str, Store], path: str, status: int
) -> None:
    url, store = registry
    await published(tmp_path, store)
    async with httpx.AsyncClient(base_url=url) as http:
        response = await http.get(path)
    assert response.status_code == status
    assert isinstance(response.json()["error"], str)


async def test_publish_needs_token_and_present_blobs(
    tmp_path: Path, registry: tuple[str, Store]
) -> None:
    url, _ = registry
    local = Store(tmp_path / "local")
    manifest = await published(tmp_path, local)
    async with RegistryClient(url, token="wrong") as bad:
        with pytest.raises(LocalProtocolError):
            await bad.publish(local, manifest.model)
    async with httpx.AsyncClient(base_url=url, headers={"authorization": f"Bearer {TOKEN}"}) as h:
        early = await h.put("/models/tiny/1", content=manifest.to_bytes())
        assert early.status_code == 409
        assert set(early.json()["missing"]) == {f.sha256 for f in manifest.files}
        wrong = await h.put(f"/blobs/sha256-{hashlib.sha256(b'a').hexdigest()}", content=b"b")
        assert wrong.status_code == 400 and "error" in wrong.json()
        mismatch = await h.put("/models/tiny/2", content=manifest.to_bytes())
        assert mismatch.status_code in (400, 409)
    async with RegistryClient(url, token=TOKEN) as client:
        await client.publish(local, manifest.model)
        assert await client.versions("tiny") == ["1"]


async def test_publish_cli_then_pull(tmp_path: Path, registry: tuple[str, Store]) -> None:
    url, _ = registry
    key = generate_key()
    save_private_key(key, tmp_path / "k.pem")
    source = make_dir(tmp_path)
    argv = ["publish", str(source), "--name", "tiny", "--version", "2", "--category", "llm"]
    argv += ["--key", str(tmp_path / "k.pem"), "--registry", url, "--token", TOKEN]
    argv += ["--chunk-size", str(CHUNK)]
    assert await trio.to_thread.run_sync(registry_main, argv) == 0
    store = Store(tmp_path / "client")
    async with RegistryClient(url) as client:
        result = await pull(
            ModelId("tiny"), store, [client], TrustStore([public_key_hex(key)]), progress=False
        )
    assert result.manifest.model == ModelId("tiny", "2")
    target = store.materialize(result.manifest.model)
    assert (target / "weights.bin").read_bytes() == (source / "weights.bin").read_bytes()


def test_local_publish_cli(tmp_path: Path) -> None:
    key = generate_key()
    save_private_key(key, tmp_path / "k.pem")
    argv = ["publish", str(make_dir(tmp_path)), "--name", "tiny", "--version", "1"]
    argv += ["--category", "llm", "--key", str(tmp_path / "k.pem"), "--root", str(tmp_path / "r")]
    assert registry_main(argv) == 0
    assert Store(tmp_path / "r").has_model(ModelId("tiny", "1"))
    assert registry_main([*argv[:2], "--name", "../x", *argv[4:]]) == 1


async def test_models_cli_keygen_pull_verify(
    tmp_path: Path,
    registry: tuple[str, Store],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from p2pedge.models.__main__ import main as models_main

    monkeypatch.setenv("P2PEDGE_HOME", str(tmp_path / "home"))
    url, _ = registry
    assert models_main(["keygen", str(tmp_path / "k.pem")]) == 0
    source = make_dir(tmp_path)
    argv = ["publish", str(source), "--name", "tiny", "--version", "3", "--category", "llm"]
    argv += ["--key", str(tmp_path / "k.pem"), "--registry", url, "--token", TOKEN]
    assert await trio.to_thread.run_sync(registry_main, argv) == 0
    store = str(tmp_path / "client")
    pull_argv = ["pull", "tiny@3", "--registry", url, "--store", store]
    assert await trio.to_thread.run_sync(registry_main, pull_argv) == 1  # no trusted key: refused
    pull_argv += ["--trust", str(tmp_path / "k.pem.pub"), "--no-progress"]
    capsys.readouterr()
    assert await trio.to_thread.run_sync(registry_main, pull_argv) == 0
    target = Path(capsys.readouterr().out.strip())
    assert (target / "weights.bin").read_bytes() == (source / "weights.bin").read_bytes()
    assert models_main(["verify", "tiny@3", "--store", store]) == 0
    assert models_main(["list", "--store", store]) == 0
    assert "tiny@3" in capsys.readouterr().out
    assert models_main(["gc", "--store", store]) == 0
