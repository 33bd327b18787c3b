"""What this machine offers: cores, memory, accelerators, a measured compute figure."""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import psutil

COMPUTE_CACHE = "compute.json"
log = logging.getLogger("p2pedge.node")


@dataclass(frozen=True)
class Hardware:
    os: str
    arch: str
    cpu_cores: int
    ram_total: int
    accelerators: tuple[str, ...]
    execution_providers: tuple[str, ...]


@lru_cache(maxsize=1)
def probe_hardware() -> Hardware:
    """Probed once per process: the answer does not change while we run."""
    import onnxruntime

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
        execution_providers=tuple(onnxruntime.get_available_providers()),
    )


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
