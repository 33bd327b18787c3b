"""``p2pedge_model.json``: what kind of model a directory holds and its shape facts.

Generative directories carry ``genai_config.json`` plus a manifest with ``kind`` absent
or ``"decoder"``; tensor specialists (classifiers, embedders) declare ``kind: "tensor"``
with their ONNX file and named inputs/outputs. A tensor model is an *embedder* when its
manifest also has an ``embedding`` object (:class:`EmbeddingSpec`). The file is local but
may have been fetched from a peer, so every field is type-checked before use.
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
MAX_EMBEDDING_TOKENS = 1 << 16
MAX_EMBEDDING_DIMENSIONS = 1 << 16


@dataclass(frozen=True)
class TensorSpec:
    """A declared input or output; ``None`` or a string in ``shape`` is a free dimension."""

    name: str
    dtype: str
    shape: tuple[int | None, ...] | None


@dataclass(frozen=True)
class EmbeddingSpec:
    """What makes a tensor model an embedder: text goes through ``tokenizer`` (a Hugging
    Face ``tokenizer.json`` in the model directory) into the int64 inputs ``input_ids``
    and ``attention_mask`` ([batch, tokens]); ``output`` is a float32 [batch, tokens,
    dimensions] tensor of token states, mean-pooled over the tokens the mask keeps, then
    scaled to unit length when ``normalize``. An input longer than ``max_tokens`` tokens
    is refused, never truncated."""

    tokenizer: str = "tokenizer.json"
    output: str = "last_hidden_state"
    dimensions: int = 0
    max_tokens: int = 512
    normalize: bool = True
    input_ids: str = "input_ids"
    attention_mask: str = "attention_mask"


@dataclass(frozen=True)
class Manifest:
    kind: str  # "decoder" or "tensor"
    file: str
    inputs: tuple[TensorSpec, ...] = ()
    outputs: tuple[TensorSpec, ...] = ()
    context_length: int | None = None
    vocab: int | None = None
    n_layers: int | None = None
    embedding: EmbeddingSpec | None = None
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


def _plain_file(value: object, where: str) -> str:
    """A file name inside the model directory: no path, no hidden file."""
    if (
        not isinstance(value, str)
        or not value
        or value.startswith(".")
        or len(value.encode()) > 255
        or "/" in value
        or "\\" in value
    ):
        raise ModelLoadError(f"{where} must be a plain file name, got {value!r}")
    return value


def _embedding(raw: object, model_dir: Path | None, where: str) -> EmbeddingSpec | None:
    """The ``embedding`` object of a tensor manifest, every field checked (the tokenizer
    file's presence too, given the directory)."""
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise ModelLoadError(f"{where}: 'embedding' must be an object")
    d = EmbeddingSpec()

    def name(key: str, default: str) -> str:
        value = raw.get(key, default)
        if not isinstance(value, str) or not 0 < len(value) <= 255:
            raise ModelLoadError(f"{where}: embedding.{key} must be a non-empty string")
        return value

    def size(key: str, default: int, top: int) -> int:
        value = raw.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= top:
            raise ModelLoadError(f"{where}: embedding.{key} must be an int in [1, {top}]")
        return value

    tokenizer = _plain_file(name("tokenizer", d.tokenizer), f"{where}: embedding.tokenizer")
    if model_dir is not None and not (model_dir / tokenizer).is_file():
        raise ModelLoadError(f"{model_dir} has no {tokenizer}")
    if raw.get("pooling", "mean") != "mean":
        raise ModelLoadError(f"{where}: embedding.pooling must be 'mean'")
    normalize = raw.get("normalize", True)
    if not isinstance(normalize, bool):
        raise ModelLoadError(f"{where}: embedding.normalize must be a boolean")
    return EmbeddingSpec(
        tokenizer=tokenizer,
        output=name("output", d.output),
        dimensions=size("dimensions", d.dimensions, MAX_EMBEDDING_DIMENSIONS),
        max_tokens=size("max_tokens", d.max_tokens, MAX_EMBEDDING_TOKENS),
        normalize=normalize,
        input_ids=name("input_ids", d.input_ids),
        attention_mask=name("attention_mask", d.attention_mask),
    )


def listed_embedding(data: bytes) -> EmbeddingSpec | None:
    """What a manifest's bytes say about embeddings, for listings, where a stored model
    is not materialized (and hashed) just to be listed; None when the model is no
    embedder or the bytes are not a valid manifest (loading it says why)."""
    try:
        raw = json.loads(data) if len(data) <= MAX_MANIFEST_BYTES else None
        if not isinstance(raw, dict) or raw.get("kind") != "tensor":
            return None
        return _embedding(raw.get("embedding"), None, MANIFEST)
    except (UnicodeDecodeError, ValueError, RecursionError, ModelLoadError):
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
        file = _plain_file(raw.get("file", "model.onnx"), f"{path}: 'file'")
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
            embedding=_embedding(raw.get("embedding"), model_dir, str(path)),
            raw=raw,
        )
    raise ModelLoadError(f"{path}: unknown kind {kind!r} (expected 'decoder' or 'tensor')")


def disk_bytes(model_dir: Path) -> int:
    """Bytes of model files on disk: a first guess of load cost before measuring RSS."""
    return sum(p.stat().st_size for p in model_dir.iterdir() if p.is_file())
