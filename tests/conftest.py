import dataclasses
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from p2pedge.node.config import NodeConfig, Tuning

TUNING_FIELDS = frozenset(f.name for f in dataclasses.fields(Tuning))


@pytest.fixture(autouse=True, scope="session")
def machine_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One machine cache for the session (nodes and child processes), never the user's."""
    path = tmp_path_factory.mktemp("machine-cache")
    before = os.environ.get("P2PEDGE_CACHE_DIR")
    os.environ["P2PEDGE_CACHE_DIR"] = str(path)
    yield path
    if before is None:
        del os.environ["P2PEDGE_CACHE_DIR"]
    else:
        os.environ["P2PEDGE_CACHE_DIR"] = before


@pytest.fixture
def config(tmp_path: Path) -> Callable[..., NodeConfig]:
    """Loopback node configs with their own data dirs; compute is not measured in tests.
    Keyword arguments naming a :class:`Tuning` field go into ``tuning``."""

    def make(name: str, **overrides: object) -> NodeConfig:
        tuning = {k: overrides.pop(k) for k in list(overrides) if k in TUNING_FIELDS}
        tuning.setdefault("measure_compute", False)
        return NodeConfig(data_dir=tmp_path / name, tuning=Tuning(**tuning), **overrides)  # type: ignore[arg-type]

    return make
