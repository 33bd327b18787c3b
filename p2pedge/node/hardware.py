"""What this machine offers: cores, memory, accelerators, a measured compute figure.

Probing never imports onnxruntime into a node that has not loaded a model: its
execution providers come from a one-off child process and are cached, under onnxruntime's
version, in the data directory and for the whole machine (so the next node started there
skips the probe), and an idle DHT node does not carry onnxruntime
(``docs/swarm.md`` itemises an idle node's memory).
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import psutil

COMPUTE_CACHE = "compute.json"
PROVIDERS_CACHE = "providers.json"
_ORT_DISTRIBUTIONS = (
    "onnxruntime",
    "onnxruntime-gpu",
    "onnxruntime-directml",
    "onnxruntime-openvino",
)
_PROBE = "import json, onnxruntime; print(json.dumps(onnxruntime.get_available_providers()))"
log = logging.getLogger("p2pedge.node")


@dataclass(frozen=True)
class Hardware:
    os: str
    arch: str
    cpu_cores: int
    ram_total: int
    accelerators: tuple[str, ...]
    execution_providers: tuple[str, ...]


def probe_hardware(data_dir: Path | None = None) -> Hardware:
    """This machine's facts; the execution providers are cached in ``data_dir`` and in
    the machine's cache directory."""
    accelerators = []
    if shutil.which("nvidia-smi") or Path("/proc/driver/nvidia").exists():
        accelerators.append("cuda")
    if platform.system() == "Darwin" and platform.machine() == "arm64":
        accelerators.append("apple-neural-engine")
    return Hardware(
        os=platform.system().lower(),
        arch=platform.machine(),
        cpu_cores=os.cpu_count() or 1,
        ram_total=psutil.virtual_memory().total,
        accelerators=tuple(accelerators),
        execution_providers=execution_providers(data_dir, machine_cache_dir()),
    )


def _ort_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    for name in _ORT_DISTRIBUTIONS:
        try:
            return f"{name}=={version(name)}"
        except PackageNotFoundError:
            continue
    return "none"


@lru_cache(maxsize=1)
def _probe_providers() -> tuple[str, ...]:
    """Ask onnxruntime in this process if it is loaded already, else in a child."""
    if "onnxruntime" in sys.modules:
        return tuple(sys.modules["onnxruntime"].get_available_providers())
    done = subprocess.run(
        [sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=120, check=False
    )
    try:
        names = json.loads(done.stdout) if done.returncode == 0 else None
    except ValueError:
        names = None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        log.warning("could not list onnxruntime's providers: %s", done.stderr.strip()[-200:])
        return ("CPUExecutionProvider",)
    return tuple(names)


def machine_cache_dir() -> Path:
    """Where facts about this machine (not about one node) are cached for every node on
    it: ``$P2PEDGE_CACHE_DIR``, else ``$XDG_CACHE_HOME/p2pedge``, else ``~/.cache/p2pedge``."""
    if explicit := os.environ.get("P2PEDGE_CACHE_DIR"):
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(base).expanduser() / "p2pedge"


def _read_providers(path: Path, stamp: str) -> tuple[str, ...] | None:
    try:
        cached = json.loads(path.read_text())
        names = cached.get("providers")
        if cached.get("stamp") == stamp and isinstance(names, list) and names:
            return tuple(str(n) for n in names)
    except (OSError, ValueError, AttributeError):
        log.debug("no usable providers cache at %s", path)
    return None


def execution_providers(
    data_dir: Path | None = None, machine_dir: Path | None = None
) -> tuple[str, ...]:
    """onnxruntime's available providers, from ``data_dir``'s cache or else the machine's
    (``machine_dir``) when its stamp (the installed onnxruntime and interpreter) still
    holds, else probed; the answer is written to both. A new node on a machine that ran
    one before starts without the probe's child process (a quarter CPU-second)."""
    stamp = f"{_ort_version()}/{sys.executable}"
    paths = [Path(d) / PROVIDERS_CACHE for d in (data_dir, machine_dir) if d is not None]
    cached = {path: _read_providers(path, stamp) for path in paths}
    names = next((n for n in cached.values() if n is not None), None) or _probe_providers()
    for path in paths:
        if cached[path] == names:
            continue
        try:  # written whole and renamed: nodes starting together may read it meanwhile
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_name(f"{path.name}.{os.getpid()}.tmp")
            partial.write_text(json.dumps({"stamp": stamp, "providers": list(names)}))
            os.replace(partial, path)
        except OSError as exc:  # a read-only home or cache dir only costs the next probe
            log.debug("cannot cache providers at %s: %s", path, exc)
    return names


def ram_available() -> int:
    return int(psutil.virtual_memory().available)


def measure_gflops(size: int = 384, repeats: int = 5) -> float:
    """Best-of-N GFLOP/s of a float32 matmul: a rough, comparable speed figure."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((size, size), dtype=np.float32)
    b = rng.standard_normal((size, size), dtype=np.float32)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / max(best, 1e-9) / 1e9


def cached_gflops(data_dir: Path) -> float:
    """Measured once per machine and numpy version, then read from the data directory."""
    path = Path(data_dir) / COMPUTE_CACHE
    stamp = f"{np.__version__}/{os.cpu_count()}/{platform.processor() or platform.machine()}"
    try:
        cached = json.loads(path.read_text())
        if cached.get("stamp") == stamp and isinstance(cached.get("gflops"), float):
            return float(cached["gflops"])
    except (OSError, ValueError):
        log.debug("no usable compute cache at %s; measuring", path)
    gflops = round(measure_gflops(), 2)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"stamp": stamp, "gflops": gflops}))
    return gflops
