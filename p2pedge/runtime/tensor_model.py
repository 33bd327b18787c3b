"""Non-generative specialists (classifiers, embedders): tensors in, tensors out.

A plain onnxruntime InferenceSession; the manifest's declared inputs are the contract,
checked on every call because the arrays may come from a peer. An embedder (manifest
``embedding``, see :class:`~p2pedge.runtime.manifest.EmbeddingSpec`) also takes text:
:meth:`TensorModel.embed` tokenizes, runs the graph in bounded batches and pools.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from p2pedge.errors import ModelLoadError
from p2pedge.runtime.config import RuntimeConfig
from p2pedge.runtime.manifest import EmbeddingSpec, Manifest, TensorSpec
from p2pedge.runtime.providers import pick_providers
from p2pedge.runtime.sampling import PromptTooLong

EMBED_BATCH = 16  # texts per graph run: bounds the padded [batch, tokens, dim] output


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


@dataclass(frozen=True)
class Embeddings:
    """One vector per input text (float32 [texts, dimensions]) and the tokens they took."""

    vectors: npt.NDArray[np.float32]
    tokens: int


class TensorModel:
    kind = "tensor"

    def __init__(self, model_dir: Path, manifest: Manifest, config: RuntimeConfig) -> None:
        self.path = model_dir
        self.provider, self.session = create_session(model_dir / manifest.file, config)
        self.embedding: EmbeddingSpec | None = manifest.embedding
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
        self.tokenizer: Any = None
        if self.embedding is not None:
            self.tokenizer = _embedder_tokenizer(model_dir, self.embedding, self.inputs, have_out)

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

    def embed(self, texts: Sequence[str]) -> Embeddings:
        """Mean-pooled (and, as declared, unit-length) vectors for ``texts``.

        Every text is tokenized before anything runs, so an over-long one (more than the
        manifest's ``max_tokens``) is refused with PromptTooLong before any compute.
        Batches are padded to their longest text; the mask keeps padding out of the mean,
        so a text's vector does not depend on what it was batched with.
        """
        spec = self.embedding
        if spec is None:
            raise ValueError(f"{self.path.name} is not an embedding model")
        ids = [list(e.ids) for e in self.tokenizer.encode_batch(list(texts))]
        for row in ids:
            if not row:
                raise ValueError("an input is empty after tokenization")
            if len(row) > spec.max_tokens:
                raise PromptTooLong(len(row), spec.max_tokens)
        out = np.empty((len(ids), spec.dimensions), dtype=np.float32)
        for start in range(0, len(ids), EMBED_BATCH):
            batch = ids[start : start + EMBED_BATCH]
            width = max(len(row) for row in batch)
            tokens = np.zeros((len(batch), width), dtype=np.int64)
            mask = np.zeros((len(batch), width), dtype=np.int64)
            for i, row in enumerate(batch):
                tokens[i, : len(row)] = row
                mask[i, : len(row)] = 1
            feeds = {spec.input_ids: tokens, spec.attention_mask: mask}
            (states,) = self.session.run([spec.output], feeds)
            out[start : start + len(batch)] = _pool(np.asarray(states), mask, spec)
        return Embeddings(out, sum(len(row) for row in ids))


def _embedder_tokenizer(
    model_dir: Path, spec: EmbeddingSpec, inputs: Mapping[str, TensorSpec], outputs: set[str]
) -> Any:
    """The embedder's tokenizer, once its declared inputs and output match the graph."""
    if set(inputs) != {spec.input_ids, spec.attention_mask} or spec.output not in outputs:
        raise ModelLoadError(
            f"{model_dir}: an embedder takes exactly {spec.input_ids!r} and "
            f"{spec.attention_mask!r} and has the output {spec.output!r}"
        )
    if any(inputs[name].dtype != "int64" for name in inputs):
        raise ModelLoadError(f"{model_dir}: an embedder's inputs are int64")
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(model_dir / spec.tokenizer))
    except Exception as exc:  # tokenizers raises its own Exception type on bad files
        raise ModelLoadError(f"{model_dir}: cannot read {spec.tokenizer}: {exc}") from exc


def _pool(
    states: npt.NDArray[Any], mask: npt.NDArray[np.int64], spec: EmbeddingSpec
) -> npt.NDArray[np.float32]:
    """Mean over the tokens ``mask`` keeps, then unit length when the manifest says so."""
    if states.ndim != 3 or states.shape[:2] != mask.shape or states.shape[2] != spec.dimensions:
        raise ModelLoadError(
            f"embedder output {spec.output!r} has shape {states.shape}, expected "
            f"[{mask.shape[0]}, {mask.shape[1]}, {spec.dimensions}]"
        )
    keep = mask[:, :, None].astype(np.float64)
    mean = (states.astype(np.float64) * keep).sum(axis=1) / keep.sum(axis=1)
    if spec.normalize:
        mean /= np.maximum(np.linalg.norm(mean, axis=1, keepdims=True), 1e-12)
    pooled: npt.NDArray[np.float32] = mean.astype(np.float32)
    return pooled


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
