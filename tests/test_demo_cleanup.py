"""``examples/demo.py`` removes its scratch directory on every exit path.

The demo itself takes minutes on the real model, so these run its ``main`` with the
first node replaced by one that fails (an error, then Ctrl-C) and drive ``demo_root``
through a normal end; the temp dir is redirected into ``tmp_path`` to be inspected.
"""

from __future__ import annotations

import importlib.util
import tempfile
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import trio

DEMO = Path(__file__).resolve().parent.parent / "examples" / "demo.py"


@pytest.fixture
def demo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    spec = importlib.util.spec_from_file_location("p2pedge_demo_under_test", DEMO)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    monkeypatch.setattr(module, "real_model_dir", lambda: tmp_path / "model")
    return module


def scratch_of(tmp_path: Path) -> list[Path]:
    return list((tmp_path / "tmp").iterdir())


def failing_node(exc: BaseException, seen: list[Path]) -> type:
    """A stand-in for ``Node`` that writes into its data dir, then raises ``exc``."""

    class Failing:
        def __init__(self, config: Any) -> None:
            self.data_dir = Path(config.data_dir)

        async def __aenter__(self) -> None:
            self.data_dir.mkdir(parents=True)
            (self.data_dir / "weights.bin").write_bytes(b"x" * 1024)
            seen.append(self.data_dir)
            raise exc

        async def __aexit__(self, *exc_info: object) -> None:
            return None

    return Failing


def test_normal_end_removes_the_dir(demo: ModuleType, tmp_path: Path) -> None:
    with demo.demo_root() as root:
        (root / "store").mkdir()
        (root / "store" / "chunk").write_bytes(b"x" * 1024)
        assert scratch_of(tmp_path) == [root]
    assert scratch_of(tmp_path) == []


def test_error_removes_the_dir(
    demo: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[Path] = []
    monkeypatch.setattr(demo, "Node", failing_node(RuntimeError("node failed"), seen))
    with pytest.raises(RuntimeError, match="node failed"):
        trio.run(demo.main)
    assert len(seen) == 1 and seen[0].parent.parent == tmp_path / "tmp"  # it did write there
    assert scratch_of(tmp_path) == []


def test_ctrl_c_removes_the_dir(
    demo: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[Path] = []
    monkeypatch.setattr(demo, "Node", failing_node(KeyboardInterrupt(), seen))
    with pytest.raises(KeyboardInterrupt):
        trio.run(demo.main)
    assert len(seen) == 1
    assert scratch_of(tmp_path) == []
