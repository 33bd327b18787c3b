"""Test kit shared by the project's tests; attributes load lazily so importing is cheap."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from p2pedge.testing.embedder import build_tiny_embedder as build_tiny_embedder
    from p2pedge.testing.embedder import reference_embeddings as reference_embeddings
    from p2pedge.testing.tiny import OrtStepper as OrtStepper
    from p2pedge.testing.tiny import build_tiny_model as build_tiny_model
    from p2pedge.testing.tiny import random_llama_weights as random_llama_weights
    from p2pedge.testing.tiny import real_gguf_path as real_gguf_path
    from p2pedge.testing.tiny import real_model_dir as real_model_dir
    from p2pedge.testing.tiny import tiny_config as tiny_config
    from p2pedge.testing.tiny import tiny_tokenizer_spec as tiny_tokenizer_spec
    from p2pedge.testing.tiny import tiny_weights as tiny_weights

_LAZY = {
    "build_tiny_embedder": "p2pedge.testing.embedder",
    "reference_embeddings": "p2pedge.testing.embedder",
    "OrtStepper": "p2pedge.testing.tiny",
    "build_tiny_model": "p2pedge.testing.tiny",
    "random_llama_weights": "p2pedge.testing.tiny",
    "real_gguf_path": "p2pedge.testing.tiny",
    "real_model_dir": "p2pedge.testing.tiny",
    "tiny_config": "p2pedge.testing.tiny",
    "tiny_tokenizer_spec": "p2pedge.testing.tiny",
    "tiny_weights": "p2pedge.testing.tiny",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'p2pedge.testing' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
