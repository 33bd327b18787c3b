"""Shard server processes for the sharded benchmark: start, stop, and a client's config.

Each server is a real ``python -m p2pedge.node --serve`` process on 127.0.0.1 with one
compute thread; it reports its peer id and address as a JSON event on stdout.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from p2pedge.ids import LayerRange
from p2pedge.node.config import NodeConfig, Tuning
from p2pedge.protocols.pipeline.serving import ensure_shard_dir

MODEL = "smollm2-135m-instruct"
N_LAYERS = 30
THIRDS = ("0-10", "10-20", "20-30")
STEP_TIMEOUT = 30.0
# every server inlines its decode steps, so the 0-30 server (about 45 ms a step here, near
# the 50 ms default) is served like the thirds and the 1-hop vs 3-hop difference is hops
INLINE_STEP_MS = 100


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    peer_id: str
    addr: str
    layers: str


def _drain(pipe: IO[bytes]) -> None:
    for _ in pipe:
        pass


def start_server(
    model_dir: Path,
    root: Path,
    name: str,
    layers: str,
    boot: str | None,
    inline_step_ms: float = INLINE_STEP_MS,
) -> Server:
    cmd = [sys.executable, "-m", "p2pedge.node", "--json", "--threads", "1"]
    cmd += ["--inline-step-ms", str(inline_step_ms)]
    cmd += ["--data-dir", str(root / name), "--model", f"{MODEL}={model_dir}"]
    cmd += ["--serve", f"{MODEL}:{layers}", *(["--bootstrap", boot] if boot else [])]
    (root / name).mkdir(parents=True, exist_ok=True)
    err = (root / name / "stderr.log").open("wb")
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=err, env={**os.environ, "PYTHONUNBUFFERED": "1"}
    )
    assert proc.stdout is not None
    for line in proc.stdout:
        event = json.loads(line)
        if event["event"] == "listening":
            threading.Thread(target=_drain, args=(proc.stdout,), daemon=True).start()
            return Server(proc, str(event["peer_id"]), str(event["addrs"][0]), layers)
    raise RuntimeError(f"server {name} exited; see {root / name / 'stderr.log'}")


def stop(servers: Sequence[Server]) -> None:
    for server in servers:
        if server.proc.poll() is None:
            server.proc.send_signal(signal.SIGINT)
    for server in servers:
        try:
            server.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            server.proc.wait()


def client_config(root: Path, name: str, servers: Sequence[Server], model_dir: Path) -> NodeConfig:
    return NodeConfig(
        data_dir=root / name,
        bootstrap=tuple(s.addr for s in servers),
        model_dirs=((MODEL, model_dir),),
        tuning=Tuning(measure_compute=False, shard_step_timeout=STEP_TIMEOUT, threads=1),
    )


def third_dirs(root: Path, model_dir: Path) -> list[Path]:
    """The shard directories the three servers of ``THIRDS`` load (built if missing)."""
    return [
        ensure_shard_dir(model_dir, LayerRange.parse(layers), root / f"shard{i}" / "shards")
        for i, layers in enumerate(THIRDS)
    ]
