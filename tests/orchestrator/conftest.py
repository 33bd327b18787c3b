"""Real tiny models (distinct seeds, so distinct directories and real loads) and a
catalog that spreads the five categories over them."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from p2pedge.errors import ModelNotCached
from p2pedge.ids import ModelId
from p2pedge.node.inference import LocalInference
from p2pedge.orchestrator.catalog import Catalog
from p2pedge.runtime.config import RuntimeConfig
from p2pedge.testing import build_tiny_model

TINY = ("tiny-a", "tiny-b", "tiny-c")

CATALOG = """
[[specialist]]
name = "chat"
category = "chat"
model = "tiny-a"
system = "Be brief."
max_tokens = 6

[[specialist]]
name = "summarize"
category = "summarize"
model = "tiny-a"
template = "Summarize: {text}"
max_tokens = 6
temperature = 0.0

[[specialist]]
name = "translate"
category = "translate"
model = "tiny-b"
max_tokens = 6

[[specialist]]
name = "explain-code"
category = "explain-code"
model = "tiny-c"
max_tokens = 6

[[specialist]]
name = "math"
category = "math"
model = "tiny-c"
max_tokens = 6
"""


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("orch-models")
    return {name: build_tiny_model(root / name, seed=i) for i, name in enumerate(TINY)}


def resolver_for(dirs: dict[str, Path]):  # type: ignore[no-untyped-def]
    def resolve(mid: ModelId) -> Path:
        if mid.name not in dirs:
            raise ModelNotCached(str(mid))
        return dirs[mid.name]

    return resolve


@pytest.fixture
def make_local(tiny_dirs: dict[str, Path]):  # type: ignore[no-untyped-def]
    """``make_local(names, max_models)``: a LocalInference that stores only ``names``."""
    made: list[LocalInference] = []

    def make(names: tuple[str, ...] = TINY, max_models: int = 2) -> LocalInference:
        dirs = {n: tiny_dirs[n] for n in names}
        inference = LocalInference(
            resolver_for(dirs), RuntimeConfig(max_models=max_models, intra_op_threads=1)
        )
        made.append(inference)
        return inference

    yield make
    for inference in made:
        inference.close()


@pytest.fixture
def catalog() -> Catalog:
    return Catalog.from_toml(CATALOG)


@pytest.fixture
async def local(tiny_dirs: dict[str, Path]) -> AsyncIterator[LocalInference]:
    inference = LocalInference(
        resolver_for(tiny_dirs), RuntimeConfig(max_models=2, intra_op_threads=1)
    )
    try:
        yield inference
    finally:
        inference.close()
