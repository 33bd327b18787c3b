"""A tiny synthetic embedding model: a real ONNX graph and a real tokenizer file.

The graph maps token ids to token states ``tanh(E[ids] @ W) * mask``; the runtime
mean-pools them over the mask and normalises (the manifest's ``embedding`` object). The
tokenizer is the tiny byte-level BPE the test decoders use. :func:`reference_embeddings`
computes the same vectors with numpy alone, so tests can check the whole path.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt

from p2pedge.models.convert.tokenizer import write_tokenizer
from p2pedge.runtime.manifest import MANIFEST
from p2pedge.testing.tiny import tiny_tokenizer_spec

EMBEDDER_DIMENSIONS = 32
EMBEDDER_MAX_TOKENS = 64


def embedder_weights(
    seed: int, dimensions: int = EMBEDDER_DIMENSIONS
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    """The embedding table E [vocab, dimensions] and the projection W for ``seed``."""
    rng = np.random.default_rng(seed)
    vocab = len(tiny_tokenizer_spec().tokens)
    table = rng.standard_normal((vocab, dimensions)).astype(np.float32)
    proj = (rng.standard_normal((dimensions, dimensions)) / np.sqrt(dimensions)).astype(np.float32)
    return table, proj


def build_tiny_embedder(
    out_dir: Path,
    seed: int = 0,
    *,
    dimensions: int = EMBEDDER_DIMENSIONS,
    max_tokens: int = EMBEDDER_MAX_TOKENS,
) -> Path:
    """Write an embedder directory (model.onnx, tokenizer files, manifest); returns it."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    out_dir.mkdir(parents=True, exist_ok=True)
    table, proj = embedder_weights(seed, dimensions)
    nodes = [
        helper.make_node("Gather", ["table", "input_ids"], ["tokens"]),
        helper.make_node("MatMul", ["tokens", "proj"], ["mixed"]),
        helper.make_node("Tanh", ["mixed"], ["squashed"]),
        helper.make_node("Cast", ["attention_mask"], ["maskf"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["maskf", "last_axis"], ["mask3"]),
        helper.make_node("Mul", ["squashed", "mask3"], ["last_hidden_state"]),
    ]
    initializers = [
        numpy_helper.from_array(table, "table"),
        numpy_helper.from_array(proj, "proj"),
        numpy_helper.from_array(np.array([-1], dtype=np.int64), "last_axis"),
    ]
    ids = ["batch", "tokens"]
    graph = helper.make_graph(
        nodes,
        "tiny-embedder",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ids),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ids),
        ],
        [helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, [*ids, dimensions])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(out_dir / "model.onnx"))
    write_tokenizer(out_dir, tiny_tokenizer_spec())
    token_shape = [None, None]
    manifest = {
        "kind": "tensor",
        "file": "model.onnx",
        "inputs": [
            {"name": "input_ids", "dtype": "int64", "shape": token_shape},
            {"name": "attention_mask", "dtype": "int64", "shape": token_shape},
        ],
        "outputs": [
            {"name": "last_hidden_state", "dtype": "float32", "shape": [None, None, dimensions]}
        ],
        "embedding": {
            "tokenizer": "tokenizer.json",
            "output": "last_hidden_state",
            "dimensions": dimensions,
            "max_tokens": max_tokens,
            "pooling": "mean",
            "normalize": True,
        },
    }
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return out_dir


def reference_embeddings(
    model_dir: Path, texts: Sequence[str], seed: int = 0, dimensions: int = EMBEDDER_DIMENSIONS
) -> npt.NDArray[np.float64]:
    """The embedder's vectors by numpy alone, one text at a time (no padding, no ORT)."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    table, proj = embedder_weights(seed, dimensions)
    out = []
    for text in texts:
        ids = tokenizer.encode(text).ids
        mean = np.tanh(table[ids].astype(np.float64) @ proj.astype(np.float64)).mean(axis=0)
        out.append(mean / np.linalg.norm(mean))
    return np.array(out)
