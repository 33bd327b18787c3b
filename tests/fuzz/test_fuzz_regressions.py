"""Every crash ``make fuzz`` found, kept as a test.

Crashes in decoders this slice does not own stay strict xfails until their owner fixes
them (the reproducers are the fuzzer's own inputs); fixed ones are plain tests.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import gguf
import httpx
import numpy as np
import pytest
import trio

from p2pedge.errors import ModelLoadError, RemoteProtocolError
from p2pedge.models.convert.gguf_reader import GGUFFormatError, read_gguf
from p2pedge.models.keys import generate_key
from p2pedge.models.manifest import ManifestError, parse_manifest
from p2pedge.models.store import Store
from p2pedge.registry.app import RegistryApp
from p2pedge.registry.client import RegistryClient
from p2pedge.registry.server import serve_app
from p2pedge.runtime.manifest import GENAI_CONFIG, MANIFEST, read_manifest

DEEP = b"[" * 100_000  # the reproducer: json.loads recurses once per bracket


async def test_registry_refuses_a_deeply_nested_manifest(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    """Found by fuzz target registry.requests: the RecursionError escaped the app (500)."""
    app = RegistryApp(Store(tmp_path / "r"), token="t")
    port = await nursery.start(serve_app, app)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
        auth = {"authorization": "Bearer t"}
        response = await http.put("/models/tiny/1", content=DEEP, headers=auth)
        assert response.status_code == 400 and "nests too deeply" in response.json()["error"]
        assert (await http.get("/models")).json() == {"models": []}  # still serving
    assert app.uploads.held() == 0


async def test_registry_client_refuses_deeply_nested_json() -> None:
    """A hostile registry's listing is a RemoteProtocolError, not a RecursionError."""
    client = RegistryClient("http://registry.invalid")
    await client.aclose()
    client._http = httpx.AsyncClient(
        base_url="http://registry.invalid",
        transport=httpx.MockTransport(lambda request: httpx.Response(200, content=DEEP[:8000])),
    )
    async with client:
        with pytest.raises(RemoteProtocolError, match="not JSON"):
            await client.list_models()


def test_parse_manifest_refuses_deep_nesting() -> None:
    """Fuzz target models.manifest: ``RecursionError at p2pedge/models/manifest.py:168``.

    ``parse_manifest`` catches ValueError and UnicodeDecodeError around ``json.loads`` but
    not RecursionError; its callers (pulls from peers, the registry) expect ManifestError.
    """
    with pytest.raises(ManifestError):
        parse_manifest(DEEP)


def test_read_manifest_refuses_deep_nesting(tmp_path: Path) -> None:
    """Fuzz target runtime.manifest: ``RecursionError at p2pedge/runtime/manifest.py:49``.

    ``_read_json`` catches OSError, UnicodeDecodeError and JSONDecodeError, not
    RecursionError; a model directory fetched from a peer can carry such a file.
    """
    (tmp_path / MANIFEST).write_bytes(DEEP[:2000])
    (tmp_path / GENAI_CONFIG).write_bytes(b"{}")
    with pytest.raises(ModelLoadError):
        read_manifest(tmp_path)


def test_read_manifest_refuses_an_overlong_file_name(tmp_path: Path) -> None:
    """Fuzz target runtime.manifest: ``OSError at p2pedge/runtime/manifest.py:109``.

    A ``file`` name over the filesystem's 255-byte limit makes ``Path.is_file`` raise
    ``OSError`` (ENAMETOOLONG) instead of answering False.
    """
    manifest = {"kind": "tensor", "file": "x" * 1000, "inputs": [{"name": "x"}], "outputs": []}
    (tmp_path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ModelLoadError):
        read_manifest(tmp_path)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("llama.block_count", "abc"),  # int() of a string: ValueError
        ("llama.block_count", [1, 2]),  # int() of a list: TypeError
        ("llama.embedding_length", math.nan),  # int() of NaN: ValueError
        ("tokenizer.ggml.tokens", 7),  # iterating an int: TypeError
        ("tokenizer.ggml.bos_token_id", "x"),
        ("tokenizer.ggml.scores", ["a", "b"]),
    ],
)
def test_gguf_metadata_of_the_wrong_type_is_named(tmp_path: Path, key: str, value: object) -> None:
    """Fuzz target gguf.header (mistyped-field seeds): read_gguf raised ValueError and
    TypeError from ``int()``/``float()`` of whatever type the file chose for a key."""
    metadata: dict[str, object] = {
        "llama.block_count": 1, "llama.context_length": 32, "llama.embedding_length": 8,
        "llama.feed_forward_length": 8, "llama.attention.head_count": 2,
        "llama.attention.layer_norm_rms_epsilon": 1e-5, "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.tokens": ["a", "b"], "tokenizer.ggml.bos_token_id": 0,
    }  # fmt: skip
    metadata[key] = value
    path = tmp_path / "mistyped.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    for name, item in metadata.items():
        if isinstance(item, list):
            writer.add_array(name, item)
        elif isinstance(item, str):
            writer.add_string(name, item)
        elif isinstance(item, float):
            writer.add_float32(name, item)
        else:
            writer.add_uint32(name, int(item))  # type: ignore[call-overload]
    writer.add_tensor("token_embd.weight", np.zeros((2, 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(GGUFFormatError) as info:
        read_gguf(path)
    assert info.value.key == key


@pytest.mark.parametrize("header", ["bytes=" + "9" * 5000 + "-", "bytes=-" + "1" * 4400])
async def test_registry_range_with_thousands_of_digits_is_416(
    tmp_path: Path, nursery: trio.Nursery, header: str
) -> None:
    """Found while writing the registry harness (its fuzzer now makes such digit strings):
    ``int()`` of over 4300 digits raises ValueError, which escaped the app as a 500."""
    store = Store(tmp_path / "r")
    source = tmp_path / "m"
    source.mkdir()
    (source / "w.bin").write_bytes(b"w" * 100)
    manifest = store.add_model_dir(source, "tiny", "1", "llm", generate_key(), chunk_size=1024)
    port = await nursery.start(serve_app, RegistryApp(store, token="t"))
    path = f"/blobs/sha256-{manifest.files[0].sha256}"
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
        response = await http.get(path, headers={"range": header})
        assert response.status_code == 416 and "error" in response.json()
        assert (await http.get(path)).content == b"w" * 100  # still serving
