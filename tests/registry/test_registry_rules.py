"""Registry publishing rules and upload bounds, against the real server over loopback.

Versions are immutable, a name belongs to its first publisher's key (plus operator grants),
``latest`` is not a version, and uploads are bounded in size, time and concurrency per
client address; after every refusal the registry still serves a well-behaved client.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import httpx
import pytest
import trio
import trio.testing
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from p2pedge.errors import ConfigError, RemoteProtocolError
from p2pedge.ids import ModelId
from p2pedge.models.keys import generate_key, public_key_hex, save_private_key
from p2pedge.models.manifest import Manifest
from p2pedge.models.store import Store
from p2pedge.quota import Limit
from p2pedge.registry.__main__ import main as registry_main
from p2pedge.registry.app import RegistryApp, RegistryLimits
from p2pedge.registry.client import RegistryClient
from p2pedge.registry.owners import parse_grants
from p2pedge.registry.server import serve_app

CHUNK = 4096
TOKEN = "s3cret"
AUTH = {"authorization": f"Bearer {TOKEN}"}


@dataclass
class Registry:
    url: str
    port: int
    app: RegistryApp
    root: Path


async def start(
    tmp_path: Path,
    nursery: trio.Nursery,
    *,
    limits: RegistryLimits | None = None,
    grants: dict[str, frozenset[str]] | None = None,
) -> Registry:
    root = tmp_path / "registry"
    app = RegistryApp(Store(root), token=TOKEN, grants=grants, limits=limits or RegistryLimits())
    port = await nursery.start(partial(serve_app, app))
    return Registry(f"http://127.0.0.1:{port}", port, app, root)


_FOLDERS = itertools.count()


def signed(
    tmp_path: Path, key: Ed25519PrivateKey, version: str, content: bytes, name: str = "tiny"
) -> tuple[Store, Manifest]:
    """A local store holding ``name@version`` signed by ``key`` (its own folder per call)."""
    folder = tmp_path / f"src-{next(_FOLDERS)}"
    (folder / "model").mkdir(parents=True)
    (folder / "model" / "weights.bin").write_bytes(content)
    store = Store(folder / "store")
    manifest = store.add_model_dir(folder / "model", name, version, "llm", key, chunk_size=CHUNK)
    return store, manifest


async def publish(url: str, store: Store, model: ModelId) -> None:
    async with RegistryClient(url, token=TOKEN) as client:
        await client.publish(store, model)


async def put_manifest(url: str, manifest: Manifest) -> httpx.Response:
    model = manifest.model
    async with httpx.AsyncClient(base_url=url, headers=AUTH) as http:
        return await http.put(f"/models/{model.name}/{model.version}", content=manifest.to_bytes())


async def well_behaved(reg: Registry, tmp_path: Path, version: str) -> None:
    """A fresh publisher can still publish a new name and read it back."""
    key = generate_key()
    store, manifest = signed(tmp_path, key, version, b"fine" * 100, name=f"ok-{version}")
    await publish(reg.url, store, manifest.model)
    async with httpx.AsyncClient(base_url=reg.url) as http:
        got = await http.get(f"/models/ok-{version}/latest")
    assert got.status_code == 200 and got.content == manifest.to_bytes()


async def test_versions_are_immutable_whoever_signs(tmp_path: Path, nursery: trio.Nursery) -> None:
    owner, other = generate_key(), generate_key()
    reg = await start(tmp_path, nursery, grants={"tiny": frozenset({public_key_hex(other)})})
    store, first = signed(tmp_path, owner, "1", b"a" * 5000)
    await publish(reg.url, store, first.model)
    again = await put_manifest(reg.url, first)
    assert again.status_code == 200 and again.json()["stored"] is False  # idempotent retry
    for key in (owner, other):  # the owner and a granted key alike
        store2, changed = signed(tmp_path, key, "1", b"b" * 5000)
        async with RegistryClient(reg.url, token=TOKEN) as client:
            with pytest.raises(RemoteProtocolError, match="immutable"):
                await client.publish(store2, changed.model)
    async with httpx.AsyncClient(base_url=reg.url) as http:
        assert (await http.get("/models/tiny/1")).content == first.to_bytes()
    await well_behaved(reg, tmp_path, "2")


async def test_name_belongs_to_first_publisher_unless_granted(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    owner, granted, stranger = generate_key(), generate_key(), generate_key()
    reg = await start(tmp_path, nursery, grants={"tiny": frozenset({public_key_hex(granted)})})
    store, first = signed(tmp_path, owner, "1", b"a" * 5000)
    await publish(reg.url, store, first.model)
    store_s, by_stranger = signed(tmp_path, stranger, "2", b"s" * 5000)
    async with RegistryClient(reg.url, token=TOKEN) as client:
        for digest in {f.sha256 for f in by_stranger.files}:
            await client.upload_blob(digest, store_s.blob_path(digest))
    refused = await put_manifest(reg.url, by_stranger)
    assert refused.status_code == 403 and refused.json()["publisher"] == public_key_hex(stranger)
    store_g, by_granted = signed(tmp_path, granted, "3", b"g" * 5000)
    await publish(reg.url, store_g, by_granted.model)
    store_o, by_owner = signed(tmp_path, owner, "4", b"o" * 5000)
    await publish(reg.url, store_o, by_owner.model)
    async with httpx.AsyncClient(base_url=reg.url) as http:
        assert (await http.get("/models/tiny/versions")).json()["versions"] == ["1", "3", "4"]
    # the stranger may still claim a name nobody has published
    store_n, fresh = signed(tmp_path, stranger, "1", b"n" * 5000, name="other")
    await publish(reg.url, store_n, fresh.model)


async def test_legacy_names_belong_to_their_stored_publishers(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    owner, stranger = generate_key(), generate_key()
    root = tmp_path / "registry"
    legacy = Store(root)  # published before owner records existed: no owners/tiny file
    source = tmp_path / "legacy"
    source.mkdir()
    (source / "w.bin").write_bytes(b"l" * 3000)
    legacy.add_model_dir(source, "tiny", "1", "llm", owner, chunk_size=CHUNK)
    reg = await start(tmp_path, nursery)
    store, manifest = signed(tmp_path, stranger, "2", b"s" * 5000)
    async with RegistryClient(reg.url, token=TOKEN) as client:
        for digest in {f.sha256 for f in manifest.files}:
            await client.upload_blob(digest, store.blob_path(digest))
    assert (await put_manifest(reg.url, manifest)).status_code == 403
    store_o, by_owner = signed(tmp_path, owner, "2", b"o" * 5000)
    await publish(reg.url, store_o, by_owner.model)
    assert (root / "owners" / "tiny").read_text().strip() == public_key_hex(owner)


async def test_latest_is_not_a_version(tmp_path: Path, nursery: trio.Nursery) -> None:
    key = generate_key()
    reg = await start(tmp_path, nursery)
    for literal in ("latest", "Latest", "LATEST"):
        store, manifest = signed(tmp_path, key, literal, b"x" * 5000)
        async with RegistryClient(reg.url, token=TOKEN) as client:
            for digest in {f.sha256 for f in manifest.files}:
                await client.upload_blob(digest, store.blob_path(digest))
        response = await put_manifest(reg.url, manifest)
        assert response.status_code == 400 and "not a version" in response.json()["error"]
    # a literal "latest" left in an old store does not shadow newer versions
    server_store = reg.app.store
    source = tmp_path / "legacy"
    source.mkdir()
    (source / "w.bin").write_bytes(b"l" * 3000)
    server_store.add_model_dir(source, "tiny", "latest", "llm", key, chunk_size=CHUNK)
    store, newer = signed(tmp_path, key, "9", b"n" * 5000)
    await publish(reg.url, store, newer.model)
    async with httpx.AsyncClient(base_url=reg.url) as http:
        assert (await http.get("/models/tiny/latest")).content == newer.to_bytes()
        assert (await http.get("/models/tiny/versions")).json()["versions"] == ["9"]
        assert (await http.get("/models/tiny")).json()["latest"]["version"] == "9"


def test_publish_cli_refuses_latest_and_existing_versions(tmp_path: Path) -> None:
    save_private_key(generate_key(), tmp_path / "k.pem")
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "w.bin").write_bytes(b"w" * 100)
    root = str(tmp_path / "r")
    base = ["publish", str(tmp_path / "src"), "--name", "tiny", "--category", "llm"]
    base += ["--key", str(tmp_path / "k.pem"), "--root", root]
    assert registry_main([*base, "--version", "latest"]) == 1
    assert registry_main([*base, "--version", "1"]) == 0
    before = (Path(root) / "manifests" / "tiny" / "1.json").read_bytes()
    assert registry_main([*base, "--version", "1"]) == 1
    assert (Path(root) / "manifests" / "tiny" / "1.json").read_bytes() == before
    assert Store(Path(root)).versions("tiny") == ["1"]


def test_grants_file(tmp_path: Path) -> None:
    a, b = public_key_hex(generate_key()), public_key_hex(generate_key())
    grants = parse_grants(f"# operator grants\ntiny {a}\ntiny {b.upper()}  # second\nother {a}\n")
    assert grants == {"tiny": frozenset({a, b}), "other": frozenset({a})}
    for bad in (f"tiny {a} extra", "tiny nothex", f"../x {a}", "tiny"):
        with pytest.raises(ConfigError, match="grants:1"):
            parse_grants(bad)
    (tmp_path / "g").write_text("tiny zz\n")
    argv = ["serve", "--root", str(tmp_path / "r"), "--grants", str(tmp_path / "g")]
    assert registry_main(argv) == 1  # a bad grants file stops the registry before it serves


async def raw_request(port: int, head: bytes, body: bytes = b"") -> trio.SocketStream:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    await stream.send_all(head + body)
    return stream


async def read_reply(stream: trio.SocketStream) -> bytes:
    data = b""
    while chunk := await stream.receive_some(65536):
        data += chunk
    return data


def put_head(path: str, length: int) -> bytes:
    return (
        f"PUT {path} HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {TOKEN}\r\n"
        f"content-length: {length}\r\n\r\n"
    ).encode()


SLOW = RegistryLimits(read_idle_s=0.3, grace_s=0.3, min_rate=1 << 20, header_s=0.5)
BLOB = f"/blobs/sha256-{'ab' * 32}"


async def test_slow_loris_upload_is_cut(tmp_path: Path, nursery: trio.Nursery) -> None:
    reg = await start(tmp_path, nursery, limits=SLOW)
    stream = await raw_request(reg.port, put_head(BLOB, 100_000), b"x" * 10)
    with trio.fail_after(10):  # a safety net; the server must cut it after ~0.3 s
        reply = await read_reply(stream)
    assert reply.startswith(b"HTTP/1.1 408") and b"too slow" in reply
    assert reg.app.uploads.held() == 0
    await well_behaved(reg, tmp_path, "1")


async def test_trickling_upload_is_cut_by_its_average_rate(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    """Bytes that keep coming, but too slowly, do not reset the deadline."""
    limits = RegistryLimits(read_idle_s=5.0, grace_s=0.3, min_rate=1000)
    reg = await start(tmp_path, nursery, limits=limits)
    stream = await raw_request(reg.port, put_head(BLOB, 100_000))
    cut = trio.Event()

    async def trickle() -> None:
        with trio.move_on_after(10):
            while not cut.is_set():
                await stream.send_all(b"x")
                await trio.sleep(0.05)  # the attacker's pace, not synchronisation

    async with trio.open_nursery() as inner:
        inner.start_soon(trickle)
        with trio.fail_after(10):
            head = await stream.receive_some(65536)
        cut.set()
    assert head.startswith(b"HTTP/1.1 408")
    assert reg.app.uploads.held() == 0
    await well_behaved(reg, tmp_path, "1")


async def test_slow_request_head_is_dropped(tmp_path: Path, nursery: trio.Nursery) -> None:
    reg = await start(tmp_path, nursery, limits=SLOW)
    stream = await raw_request(reg.port, b"PUT /blobs/x HTTP/1.1\r\nhost: x\r\n")
    with trio.fail_after(3):  # header_s is 0.5 s here; hypercorn's default would be 5 s
        assert await read_reply(stream) == b""  # closed without a request ever starting
    await well_behaved(reg, tmp_path, "1")


async def test_upload_size_bounds(tmp_path: Path, nursery: trio.Nursery) -> None:
    limits = RegistryLimits(max_blob_bytes=1000, max_manifest_bytes=2000)
    reg = await start(tmp_path, nursery, limits=limits)
    async with httpx.AsyncClient(base_url=reg.url, headers=AUTH) as http:
        declared = await http.put(BLOB, content=b"x" * 1001)
        assert declared.status_code == 413

        async def chunked() -> AsyncIterator[bytes]:
            for _ in range(20):
                yield b"x" * 100

        streamed = await http.put(BLOB, content=chunked())  # no content-length
        assert streamed.status_code == 413
        manifest = await http.put("/models/tiny/1", content=json.dumps({"pad": "x" * 3000}))
        assert manifest.status_code == 413
    huge = await raw_request(reg.port, put_head(BLOB, 10**15), b"x")
    with trio.fail_after(10):
        assert (await read_reply(huge)).startswith(b"HTTP/1.1 413")  # refused before reading
    assert not any(reg.app.store.partial.iterdir())  # nothing spooled to disk is left
    assert reg.app.uploads.held() == 0
    await well_behaved(reg, tmp_path, "1")


async def test_concurrent_uploads_are_limited_per_address(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    limits = RegistryLimits(
        read_idle_s=30, grace_s=30, uploads=Limit(per_peer=10, per_source=1, total=2)
    )
    reg = await start(tmp_path, nursery, limits=limits)
    stalled = await raw_request(reg.port, put_head(BLOB, 100_000), b"x" * 10)
    with trio.fail_after(10):
        while reg.app.uploads.held(source="127.0.0.1") == 0:
            await trio.testing.wait_all_tasks_blocked()
    async with httpx.AsyncClient(base_url=reg.url, headers=AUTH) as http:
        busy = await http.put(BLOB, content=b"y")
    assert busy.status_code == 503
    assert busy.json()["limit"] == "registry.uploads" and busy.json()["scope"] == "source"
    # another address gets its own share
    transport = httpx.AsyncHTTPTransport(local_address="127.0.0.2")
    async with httpx.AsyncClient(base_url=reg.url, headers=AUTH, transport=transport) as http:
        elsewhere = await http.put(BLOB, content=b"y")
    assert elsewhere.status_code == 400  # accepted for upload; the body does not hash to it
    await stalled.aclose()
    with trio.fail_after(10):
        while reg.app.uploads.held():
            await trio.testing.wait_all_tasks_blocked()
    await well_behaved(reg, tmp_path, "1")
