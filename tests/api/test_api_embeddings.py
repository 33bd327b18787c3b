"""``POST /v1/embeddings`` with the official ``openai`` client against a real node."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest
import trio
from api_helpers import MODEL
from tokenizers import Tokenizer

from p2pedge.api import ApiApp, serve_api
from p2pedge.models.keys import generate_key
from p2pedge.node.api import api_for
from p2pedge.node.config import NodeConfig
from p2pedge.node.node import Node
from p2pedge.testing import build_tiny_embedder, reference_embeddings
from p2pedge.testing.embedder import EMBEDDER_DIMENSIONS, EMBEDDER_MAX_TOKENS

EMBEDDER = "tiny-embed"
TEXTS = ["Hello world!", "The quick brown fox jumps over the lazy dog, twice.", "Hello world!"]


@pytest.fixture(scope="session")
def embedder_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_embedder(tmp_path_factory.mktemp("embed") / EMBEDDER, seed=5)


@pytest.fixture
def embed_api(
    tiny: Path, embedder_dir: Path, config: Callable[..., NodeConfig]
) -> Callable[[], Any]:
    """A node holding the tiny decoder and the tiny embedder, with its API on loopback."""

    @asynccontextmanager
    async def run(with_node: bool = False) -> AsyncIterator[Any]:
        dirs = ((MODEL, tiny), (EMBEDDER, embedder_dir))
        async with Node(config("embed", local_only=True, model_dirs=dirs)) as node:
            async with trio.open_nursery() as nursery:
                port = await nursery.start(serve_api, ApiApp(api_for(node)))
                url = f"http://127.0.0.1:{port}/v1"
                yield (url, node) if with_node else url
                nursery.cancel_scope.cancel()

    return run


def client(base_url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0)


async def test_vectors_match_the_numpy_reference_with_usage(
    embed_api: Any, embedder_dir: Path
) -> None:
    async with embed_api() as url:
        reply = await client(url).embeddings.create(
            model=EMBEDDER, input=TEXTS, encoding_format="float"
        )
    vectors = np.array([d.embedding for d in reply.data])
    assert [d.index for d in reply.data] == [0, 1, 2]
    assert vectors.shape == (3, EMBEDDER_DIMENSIONS)
    # one padded batch through onnxruntime vs one text at a time in numpy: the mask keeps
    # the padding of the short texts out of their means
    np.testing.assert_allclose(vectors, reference_embeddings(embedder_dir, TEXTS, 5), atol=1e-5)
    assert np.array_equal(vectors[0], vectors[2])  # equal inputs, equal vectors
    assert not np.allclose(vectors[0], vectors[1])
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    tokenizer = Tokenizer.from_file(str(embedder_dir / "tokenizer.json"))
    tokens = sum(len(tokenizer.encode(t).ids) for t in TEXTS)
    assert reply.usage.prompt_tokens == reply.usage.total_tokens == tokens
    assert reply.model == EMBEDDER and reply.object == "list"


async def test_base64_decodes_to_the_same_floats(embed_api: Any) -> None:
    async with embed_api() as url:
        floats = await client(url).embeddings.create(
            model=EMBEDDER, input=TEXTS[1], encoding_format="float"
        )
        decoded = await client(url).embeddings.create(model=EMBEDDER, input=TEXTS[1])  # base64
        async with httpx.AsyncClient() as http:
            raw = await http.post(
                f"{url}/embeddings",
                json={"model": EMBEDDER, "input": TEXTS[1], "encoding_format": "base64"},
            )
    assert len(floats.data) == 1
    expected = np.array(floats.data[0].embedding, dtype=np.float32)
    assert np.array_equal(np.array(decoded.data[0].embedding, dtype=np.float32), expected)
    text = raw.json()["data"][0]["embedding"]
    assert isinstance(text, str)
    assert np.array_equal(np.frombuffer(base64.b64decode(text), dtype="<f4"), expected)


async def test_models_list_marks_the_embedder(embed_api: Any) -> None:
    async with embed_api() as url:
        listed = {m.id: m.model_dump() for m in (await client(url).models.list()).data}
    assert listed[EMBEDDER]["p2pedge"] == {
        "where": "local",
        "version": f"{EMBEDDER}@local",
        "kind": "embedding",
        "dimensions": EMBEDDER_DIMENSIONS,
    }
    assert "kind" not in listed[MODEL]["p2pedge"]  # the chat model is no embedder


async def test_a_stored_embedder_is_listed_without_materializing(
    embed_api: Any, embedder_dir: Path
) -> None:
    async with embed_api(with_node=True) as (url, node):
        store = node.models.store
        store.add_model_dir(embedder_dir, "stored-embed", "1", "embedding", generate_key())
        listed = {m.id: m.model_dump() for m in (await client(url).models.list()).data}
        assert listed["stored-embed"]["p2pedge"]["kind"] == "embedding"
        assert not (store.models / "stored-embed").exists()  # listing read the blob only
        reply = await client(url).embeddings.create(model="stored-embed", input="Hello world!")
        direct = await client(url).embeddings.create(model=EMBEDDER, input="Hello world!")
    assert reply.data[0].embedding == direct.data[0].embedding


def error_of(exc: openai.APIStatusError) -> dict[str, Any]:
    body = exc.body
    assert isinstance(body, dict)
    return body.get("error", body)


@pytest.mark.parametrize(
    ("body", "status", "code", "param"),
    [
        ({"model": "no-such-model", "input": "hi"}, 404, "model_not_found", "model"),
        ({"model": MODEL, "input": "hi"}, 400, "model_not_embedding", "model"),
        ({"model": EMBEDDER, "input": "ab " * EMBEDDER_MAX_TOKENS}, 400,
         "context_length_exceeded", "input"),
        ({"model": EMBEDDER, "input": ""}, 400, None, "input"),
        ({"model": EMBEDDER, "input": [[1, 2, 3]]}, 400, None, "input"),
        ({"model": EMBEDDER, "input": ["x"] * 257}, 400, None, "input"),
        ({"model": EMBEDDER, "input": "hi", "encoding_format": "int8"}, 400, None,
         "encoding_format"),
        ({"model": EMBEDDER, "input": "hi", "dimensions": 8}, 400, None, "dimensions"),
    ],
)  # fmt: skip
async def test_errors_have_openai_codes(
    embed_api: Any, body: dict[str, Any], status: int, code: str | None, param: str
) -> None:
    async with embed_api() as url:
        with pytest.raises(openai.APIStatusError) as caught:
            await client(url).embeddings.create(**body)
    assert caught.value.status_code == status
    error = error_of(caught.value)
    assert (error["code"], error["param"]) == (code, param)
