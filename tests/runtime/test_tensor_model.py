"""Tensor specialists: a plain InferenceSession behind a declared contract."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from p2pedge.errors import ModelLoadError
from p2pedge.runtime.config import RuntimeConfig
from p2pedge.runtime.loader import load_model
from p2pedge.runtime.providers import available_execution_providers
from p2pedge.runtime.tensor_model import TensorModel

CONFIG = RuntimeConfig(intra_op_threads=1)


def test_runs_and_returns_declared_outputs(tensor_dir: Path) -> None:
    model = load_model(tensor_dir, CONFIG)
    assert isinstance(model, TensorModel)
    assert model.provider in available_execution_providers()
    out = model.run({"x": np.ones((2, 4), dtype=np.float32)})
    assert set(out) == {"probs"}
    assert out["probs"].shape == (2, 3)
    np.testing.assert_allclose(out["probs"].sum(axis=1), 1.0, rtol=1e-5)


@pytest.mark.parametrize(
    "inputs",
    [
        {},
        {"y": np.ones((1, 4), dtype=np.float32)},
        {"x": np.ones((1, 4), dtype=np.float64)},
        {"x": np.ones((1, 5), dtype=np.float32)},
        {"x": np.ones((4,), dtype=np.float32)},
        {"x": [[1.0, 2.0, 3.0, 4.0]]},
    ],
)
def test_inputs_outside_the_contract_are_refused(tensor_dir: Path, inputs: dict) -> None:  # type: ignore[type-arg]
    model = load_model(tensor_dir, CONFIG)
    assert isinstance(model, TensorModel)
    with pytest.raises(ValueError):
        model.run(inputs)


def test_manifest_that_disagrees_with_the_graph_fails_to_load(
    tensor_dir: Path, tmp_path: Path
) -> None:
    (tmp_path / "model.onnx").write_bytes((tensor_dir / "model.onnx").read_bytes())
    manifest = json.loads((tensor_dir / "p2pedge_model.json").read_text())
    manifest["inputs"][0]["name"] = "pixels"
    (tmp_path / "p2pedge_model.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelLoadError, match="pixels"):
        load_model(tmp_path, CONFIG)
    manifest["file"] = "../model.onnx"
    (tmp_path / "p2pedge_model.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelLoadError):
        load_model(tmp_path, CONFIG)
