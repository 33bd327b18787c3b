"""Open a model directory with the right engine, measuring what the load cost."""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from p2pedge.errors import ModelLoadError
from p2pedge.runtime.config import RuntimeConfig
from p2pedge.runtime.manifest import read_manifest
from p2pedge.runtime.memory import release_free_heap, rss_bytes


class LoadedModel(Protocol):
    """What the cache needs from any loaded model (GenaiModel, TensorModel, ...)."""

    kind: str
    provider: str

    def close(self) -> None: ...


@dataclass(frozen=True)
class LoadReport:
    model: LoadedModel
    rss_bytes: int  # measured RSS growth during the load
    load_s: float  # measured wall time of the load


def _engine(kind: str) -> type[LoadedModel]:
    """The class for ``kind``; imported lazily so ``p2pedge.runtime`` stays cheap."""
    if kind == "tensor":
        from p2pedge.runtime.tensor_model import TensorModel

        return TensorModel
    from p2pedge.runtime.genai_model import GenaiModel

    return GenaiModel


def load_model(model_dir: Path, config: RuntimeConfig) -> LoadedModel:
    """Dispatch on the manifest's kind; every failure becomes ModelLoadError."""
    return _open(model_dir, config, _engine(read_manifest(model_dir).kind))


def _open(model_dir: Path, config: RuntimeConfig, engine: type[LoadedModel]) -> LoadedModel:
    manifest = read_manifest(model_dir)
    try:
        return engine(model_dir, manifest, config)  # type: ignore[call-arg]
    except ModelLoadError:
        raise
    except Exception as exc:  # native loaders raise untyped errors; re-type them
        raise ModelLoadError(f"cannot load {model_dir}: {exc}") from exc


def measured_load(model_dir: Path, config: RuntimeConfig) -> LoadReport:
    """Load and measure RSS growth and wall time (call with loads serialised).

    The engine module is imported before measuring so that library initialisation is
    not charged to the first model.
    """
    engine = _engine(read_manifest(model_dir).kind)
    gc.collect()
    release_free_heap()
    before = rss_bytes()
    start = time.perf_counter()
    model = _open(model_dir, config, engine)
    load_s = time.perf_counter() - start
    return LoadReport(model, max(0, rss_bytes() - before), load_s)
