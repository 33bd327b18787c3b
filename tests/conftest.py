from collections.abc import Callable
from pathlib import Path

import pytest

from p2pedge.node.config import NodeConfig


@pytest.fixture
def config(tmp_path: Path) -> Callable[..., NodeConfig]:
    """Loopback node configs with their own data dirs; compute is not measured in tests."""

    def make(name: str, **overrides: object) -> NodeConfig:
        return NodeConfig(data_dir=tmp_path / name, measure_compute=False, **overrides)  # type: ignore[arg-type]

    return make
