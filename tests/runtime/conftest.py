"""Model directories shared by the runtime tests (built once per session)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from p2pedge.testing import build_tiny_model


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Three tiny random Llamas with different weights (seeds 0, 1, 2)."""
    root = tmp_path_factory.mktemp("tiny")
    return {
        name: build_tiny_model(root / name, seed=seed)
        for seed, name in enumerate(("tiny-a", "tiny-b", "tiny-c"))
    }


@pytest.fixture(scope="session")
def tiny_dir(tiny_dirs: dict[str, Path]) -> Path:
    return tiny_dirs["tiny-a"]


def write_tensor_model(out: Path) -> Path:
    """A 4 -> 3 linear classifier with softmax, declared as a tensor specialist."""
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((4, 3)).astype(np.float32), "w")
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["probs"], axis=-1),
        ],
        "classifier",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", 3])],
        [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(out / "model.onnx"))
    manifest = {
        "kind": "tensor",
        "file": "model.onnx",
        "inputs": [{"name": "x", "dtype": "float32", "shape": [None, 4]}],
        "outputs": [{"name": "probs", "dtype": "float32", "shape": [None, 3]}],
    }
    (out / "p2pedge_model.json").write_text(json.dumps(manifest))
    return out


@pytest.fixture(scope="session")
def tensor_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tensor_model(tmp_path_factory.mktemp("tensor") / "clf")


@pytest.fixture(scope="session")
def broken_dir(tmp_path_factory: pytest.TempPathFactory, tiny_dir: Path) -> Path:
    """A decoder directory whose ONNX file is garbage: fails inside onnxruntime-genai."""
    out = tmp_path_factory.mktemp("broken") / "broken"
    out.mkdir()
    for f in tiny_dir.iterdir():
        (out / f.name).write_bytes(f.read_bytes())
    (out / "model.onnx").write_bytes(b"not an onnx file")
    return out
