import dataclasses
from collections.abc import Callable
from pathlib import Path

import pytest

from p2pedge.node.config import NodeConfig, Tuning

TUNING_FIELDS = frozenset(f.name for f in dataclasses.fields(Tuning))


@pytest.fixture
def config(tmp_path: Path) -> Callable[..., NodeConfig]:
    """Loopback node configs with their own data dirs; compute is not measured in tests.
    Keyword arguments naming a :class:`Tuning` field go into ``tuning``."""

    def make(name: str, **overrides: object) -> NodeConfig:
        tuning = {k: overrides.pop(k) for k in list(overrides) if k in TUNING_FIELDS}
        tuning.setdefault("measure_compute", False)
        return NodeConfig(data_dir=tmp_path / name, tuning=Tuning(**tuning), **overrides)  # type: ignore[arg-type]

    return make
