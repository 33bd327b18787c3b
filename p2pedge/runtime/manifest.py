"""``p2pedge_model.json``: what kind of model a directory holds and its shape facts.

Generative directories carry ``genai_config.json`` plus a manifest with ``kind`` absent
or ``"decoder"``; tensor specialists (classifiers, embedders) declare ``kind: "tensor"``
with their ONNX file and named inputs/outputs. The file is local but may have been
fetched from a peer, so every field is type-checked before use.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from p2pedge.errors import ModelLoadError
from p2pedge.records.facts import FACTS_FILE

MANIFEST = FACTS_FILE  # also reads kind "tensor" manifests, so it stays lenient
GENAI_CONFIG = "genai_config.json"
MAX_MANIFEST_BYTES = 1 << 20
TENSOR_DTYPES = ("float32", "float16", "int64", "int32", "bool", "uint8", "int8")


@dataclass(frozen=True)
class TensorSpec:
    """A declared input or output; ``None`` or a string in ``shape`` is a free dimension."""

    name: str
    dtype: str
    shape: tuple[int | None, ...] | None


@dataclass(frozen=True)
class Manifest:
    kind: str  # "decoder" or "tensor"
    file: str
    inputs: tuple[TensorSpec, ...] = ()
    outputs: tuple[TensorSpec, ...] = ()
    context_length: int | None = None
    vocab: int | None = None
    n_layers: int | None = None
    raw: Any = None


def _read_json(path: Path) -> Any:
    try:
        if path.stat().st_size > MAX_MANIFEST_BYTES:
            raise ModelLoadError(f"{path} is larger than {MAX_MANIFEST_BYTES} bytes")
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ModelLoadError(f"cannot read {path}: {exc}") from exc


def _opt_int(obj: dict[str, Any], *keys: str) -> int | None:
    for key in keys:
        value = obj.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _spec(obj: Any, where: str) -> TensorSpec:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        raise ModelLoadError(f"{where}: each tensor needs a string 'name'")
    dtype = obj.get("dtype", "float32")
    if dtype not in TENSOR_DTYPES:
        raise ModelLoadError(f"{where}: dtype {dtype!r} not in {TENSOR_DTYPES}")
    shape = obj.get("shape")
    dims: tuple[int | None, ...] | None = None
    if shape is not None:
        if not isinstance(shape, list):
            raise ModelLoadError(f"{where}: shape must be a list")
        dims = tuple(d if isinstance(d, int) and not isinstance(d, bool) else None for d in shape)
    return TensorSpec(obj["name"], dtype, dims)


def read_manifest(model_dir: Path) -> Manifest:
    """Describe ``model_dir``; raises ModelLoadError when it is not a loadable model."""
    if not model_dir.is_dir():
        raise ModelLoadError(f"{model_dir} is not a directory")
    path = model_dir / MANIFEST
    raw: Any = _read_json(path) if path.exists() else {}
    if not isinstance(raw, dict):
        raise ModelLoadError(f"{path} must hold a JSON object")
    kind = raw.get("kind") or "decoder"
    if kind == "decoder":
        cfg_path = model_dir / GENAI_CONFIG
        if not cfg_path.exists():
            raise ModelLoadError(f"{model_dir} has no {GENAI_CONFIG}")
        cfg = _read_json(cfg_path)
        model = cfg.get("model") if isinstance(cfg, dict) else None
        if not isinstance(model, dict):
            raise ModelLoadError(f"{cfg_path} has no 'model' object")
        decoder: dict[str, Any] = model.get("decoder") or {}
        if not isinstance(decoder, dict):
            raise ModelLoadError(f"{cfg_path}: 'decoder' must be an object")
        return Manifest(
            kind="decoder",
            file=str(decoder.get("filename", "model.onnx")),
            context_length=_opt_int(raw, "context_length") or _opt_int(model, "context_length"),
            vocab=_opt_int(raw, "vocab", "vocab_size") or _opt_int(model, "vocab_size"),
            n_layers=_opt_int(raw, "n_layers") or _opt_int(decoder, "num_hidden_layers"),
            raw=raw,
        )
    if kind == "tensor":
        file = raw.get("file", "model.onnx")
        plain = isinstance(file, str) and not file.startswith(".") and len(file.encode()) <= 255
        if not plain or "/" in file or "\\" in file:
            raise ModelLoadError(f"{path}: 'file' must be a plain file name, got {file!r}")
        if not (model_dir / file).is_file():
            raise ModelLoadError(f"{model_dir} has no {file}")
        ins, outs = raw.get("inputs", []), raw.get("outputs", [])
        if not isinstance(ins, list) or not isinstance(outs, list) or not ins:
            raise ModelLoadError(f"{path}: 'inputs' (non-empty) and 'outputs' must be lists")
        return Manifest(
            kind="tensor",
            file=file,
            inputs=tuple(_spec(o, f"{path} input") for o in ins),
            outputs=tuple(_spec(o, f"{path} output") for o in outs),
            raw=raw,
        )
    raise ModelLoadError(f"{path}: unknown kind {kind!r} (expected 'decoder' or 'tensor')")


def disk_bytes(model_dir: Path) -> int:
    """Bytes of model files on disk: a first guess of load cost before measuring RSS."""
    return sum(p.stat().st_size for p in model_dir.iterdir() if p.is_file())
