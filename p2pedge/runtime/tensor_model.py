"""Non-generative specialists (classifiers, embedders): tensors in, tensors out.

A plain onnxruntime InferenceSession; the manifest's declared inputs are the contract,
checked on every call because the arrays may come from a peer.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from p2pedge.errors import ModelLoadError
from p2pedge.runtime.config import RuntimeConfig
from p2pedge.runtime.manifest import Manifest, TensorSpec
from p2pedge.runtime.providers import pick_providers


def session_options(config: RuntimeConfig) -> ort.SessionOptions:
    """ORT options shared by every session this runtime creates (threads, spinning)."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = config.intra_op_threads
    so.inter_op_num_threads = 1
    if not config.spinning:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return so


def create_session(path: Path, config: RuntimeConfig) -> tuple[str, Any]:
    """An InferenceSession on the first configured provider that works, and its name."""
    try:
        session = ort.InferenceSession(
            str(path), session_options(config), providers=pick_providers(config.providers)
        )
    except Exception as exc:  # ORT raises several unrelated exception types on bad files
        raise ModelLoadError(f"cannot load {path}: {exc}") from exc
    return str(session.get_providers()[0]), session


class TensorModel:
    kind = "tensor"

    def __init__(self, model_dir: Path, manifest: Manifest, config: RuntimeConfig) -> None:
        self.path = model_dir
        self.provider, self.session = create_session(model_dir / manifest.file, config)
        self.inputs = {s.name: s for s in manifest.inputs}
        self.outputs = [s.name for s in manifest.outputs] or [
            o.name for o in self.session.get_outputs()
        ]
        have_in = {i.name for i in self.session.get_inputs()}
        have_out = {o.name for o in self.session.get_outputs()}
        if set(self.inputs) != have_in or not set(self.outputs) <= have_out:
            raise ModelLoadError(
                f"{model_dir}: manifest declares inputs {sorted(self.inputs)} outputs "
                f"{self.outputs}, graph has {sorted(have_in)} / {sorted(have_out)}"
            )

    def close(self) -> None:
        self.session = None

    def run(self, inputs: Mapping[str, npt.NDArray[Any]]) -> dict[str, npt.NDArray[Any]]:
        """Check ``inputs`` against the manifest, run, return the declared outputs."""
        if set(inputs) != set(self.inputs):
            raise ValueError(f"expected inputs {sorted(self.inputs)}, got {sorted(inputs)}")
        for name, arr in inputs.items():
            _check(self.inputs[name], arr)
        results = self.session.run(self.outputs, dict(inputs))
        return {n: np.asarray(r) for n, r in zip(self.outputs, results, strict=True)}


def _check(spec: TensorSpec, arr: Any) -> None:
    if not isinstance(arr, np.ndarray):
        raise ValueError(f"input {spec.name!r} must be a numpy array")
    if arr.dtype != np.dtype(spec.dtype):
        raise ValueError(f"input {spec.name!r} must be {spec.dtype}, got {arr.dtype}")
    if spec.shape is None:
        return
    if arr.ndim != len(spec.shape) or any(
        d is not None and d != got for d, got in zip(spec.shape, arr.shape, strict=True)
    ):
        raise ValueError(f"input {spec.name!r} must have shape {spec.shape}, got {arr.shape}")
