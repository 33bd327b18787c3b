"""Embedders: a tensor model whose manifest's ``embedding`` object makes it take text."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from p2pedge.errors import ModelLoadError
from p2pedge.runtime.config import RuntimeConfig
from p2pedge.runtime.loader import load_model
from p2pedge.runtime.manifest import MANIFEST, read_manifest
from p2pedge.runtime.sampling import PromptTooLong
from p2pedge.runtime.tensor_model import TensorModel
from p2pedge.testing import build_tiny_embedder, reference_embeddings
from p2pedge.testing.embedder import EMBEDDER_MAX_TOKENS

CONFIG = RuntimeConfig(intra_op_threads=1)


@pytest.fixture(scope="module")
def embedder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_embedder(tmp_path_factory.mktemp("embedder") / "e", seed=2)


def with_embedding(src: Path, out: Path, **changes: Any) -> Path:
    """A copy of ``src`` whose manifest's embedding object has ``changes`` (None drops)."""
    shutil.copytree(src, out)
    manifest = json.loads((out / MANIFEST).read_text())
    for key, value in changes.items():
        if value is None:
            manifest["embedding"].pop(key)
        else:
            manifest["embedding"][key] = value
    (out / MANIFEST).write_text(json.dumps(manifest))
    return out


def test_batches_pool_each_text_as_if_alone(embedder: Path) -> None:
    model = load_model(embedder, CONFIG)
    assert isinstance(model, TensorModel)
    texts = [f"word {'and ' * i}end" for i in range(20)]  # two batches, ragged lengths
    made = model.embed(texts)
    assert made.vectors.dtype == np.float32 and made.vectors.shape == (20, 32)
    np.testing.assert_allclose(made.vectors, reference_embeddings(embedder, texts, 2), atol=1e-5)


def test_an_over_long_text_is_refused_not_truncated(embedder: Path) -> None:
    model = load_model(embedder, CONFIG)
    assert isinstance(model, TensorModel)
    with pytest.raises(PromptTooLong, match=f"context is {EMBEDDER_MAX_TOKENS}"):
        model.embed(["short", "9" * (EMBEDDER_MAX_TOKENS + 1)])  # digits are single tokens


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"tokenizer": "../tokenizer.json"}, "plain file name"),
        ({"tokenizer": "missing.json"}, "has no missing.json"),
        ({"dimensions": None}, "dimensions must be an int"),
        ({"dimensions": True}, "dimensions must be an int"),
        ({"max_tokens": 1 << 20}, "max_tokens must be an int"),
        ({"pooling": "max"}, "pooling must be 'mean'"),
        ({"normalize": "yes"}, "normalize must be a boolean"),
        ({"output": ""}, "output must be a non-empty string"),
    ],
)
def test_bad_embedding_fields_are_refused(
    embedder: Path, tmp_path: Path, changes: dict[str, Any], message: str
) -> None:
    with pytest.raises(ModelLoadError, match=message):
        read_manifest(with_embedding(embedder, tmp_path / "m", **changes))


def test_an_embedder_must_name_its_graph_output(embedder: Path, tmp_path: Path) -> None:
    bad = with_embedding(embedder, tmp_path / "m", output="pooled")
    with pytest.raises(ModelLoadError, match="has the output 'pooled'"):
        load_model(bad, CONFIG)


def test_a_graph_wider_than_declared_fails_at_the_first_batch(
    embedder: Path, tmp_path: Path
) -> None:
    model = load_model(with_embedding(embedder, tmp_path / "m", dimensions=16), CONFIG)
    assert isinstance(model, TensorModel)
    with pytest.raises(ModelLoadError, match="expected"):
        model.embed(["hello"])
