"""llama.cpp's RPC backend for ``benchmarks/big.py``: ``rpc-server`` processes on
127.0.0.1, ``llama-bench --rpc`` for prompt and decode speed, and ``llama-completion
--rpc`` for the kill test. Built by ``make llamacpp-rpc`` (``GGML_RPC=ON``, from the same
source as ``make llamacpp``); ``--repack 0`` / ``-nr`` everywhere, since this machine's
CPU may advertise AMX and fault on it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

BIN = Path(__file__).resolve().parent.parent / ".cache" / "llamacpp" / "build-rpc" / "bin"


def bin_dir() -> Path:
    return Path(os.environ.get("LLAMACPP_RPC_BIN", BIN))


def available() -> str | None:
    """None when the binaries are built, else why not."""
    missing = [
        n
        for n in ("rpc-server", "llama-bench", "llama-completion")
        if not (bin_dir() / n).is_file()
    ]
    return (
        f"missing {', '.join(missing)} in {bin_dir()}; run `make llamacpp-rpc`" if missing else None
    )


def peak_rss(pid: int) -> int:
    """Peak resident bytes of a live process (VmHWM), 0 when it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class RpcServers:
    """``n`` rpc-server processes with ``threads`` compute threads each."""

    n: int
    threads: int
    log_dir: Path
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    ports: list[int] = field(default_factory=list)

    def start(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        for i in range(self.n):
            port = free_port()
            log = (self.log_dir / f"rpc-server{i}.log").open("wb")
            cmd = [str(bin_dir() / "rpc-server"), "-H", "127.0.0.1", "-p", str(port)]
            cmd += ["-t", str(self.threads)]
            self.procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT))
            self.ports.append(port)
        for port in self.ports:
            _wait_listening(port)

    @property
    def endpoints(self) -> str:
        return ",".join(f"127.0.0.1:{p}" for p in self.ports)

    def rss(self) -> list[int]:
        return [peak_rss(p.pid) for p in self.procs]

    def kill(self, i: int) -> None:
        self.procs[i].send_signal(signal.SIGKILL)
        self.procs[i].wait()

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def _wait_listening(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)  # polling a child's port: no event to wait on
    raise RuntimeError(f"rpc-server on port {port} did not start")


class PeakRss:
    """Samples a child's resident bytes until it exits (its VmHWM is gone by then)."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.peak = 0
        self._proc = proc
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while self._proc.poll() is None:
            self.peak = max(self.peak, peak_rss(self._proc.pid))
            time.sleep(0.05)

    def join(self) -> int:
        self._thread.join()
        return self.peak


@dataclass(frozen=True)
class BenchResult:
    prompt_tps: float  # pp<prompt>, empty context
    decode_tps: float  # tg<tokens> at depth <prompt> (after a prompt's worth of context)
    client_rss: int


def bench(gguf: Path, servers: RpcServers, prompt: int, tokens: int, threads: int) -> BenchResult:
    """One ``llama-bench`` run over the RPC servers: pp``prompt`` and tg``tokens`` at
    depth ``prompt`` (so decoding sees the same context as after our prompt)."""
    cmd = [str(bin_dir() / "llama-bench"), "-m", str(gguf), "--rpc", servers.endpoints]
    cmd += ["-p", str(prompt), "-n", str(tokens), "-d", f"0,{prompt}", "-r", "1"]
    cmd += ["-t", str(threads), "--repack", "0", "-ngl", "99", "-o", "json"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    rss = PeakRss(proc)
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"llama-bench failed ({proc.returncode}): {err.decode()[-2000:]}")
    rows = json.loads(out)
    pp = next(r for r in rows if r["n_prompt"] == prompt and r["n_depth"] == 0)
    tg = next(r for r in rows if r["n_gen"] == tokens and r["n_depth"] == prompt)
    return BenchResult(float(pp["avg_ts"]), float(tg["avg_ts"]), rss.join())


def kill_run(
    gguf: Path, servers: RpcServers, victim: int, tokens: int, threads: int, after_bytes: int = 16
) -> tuple[bool, str]:
    """Generate ``tokens`` greedily with ``llama-completion --rpc``; once it has printed
    ``after_bytes`` bytes of its answer, SIGKILL rpc-server ``victim``. Survived: it exits
    0 having printed everything (llama.cpp RPC has no replicas, so it is expected not to)."""
    cmd = [str(bin_dir() / "llama-completion"), "-m", str(gguf), "--rpc", servers.endpoints]
    cmd += ["-p", "The capital of France is", "-n", str(tokens), "--temp", "0", "-no-cnv"]
    cmd += ["--ignore-eos", "-t", str(threads), "-nr", "-ngl", "99", "--no-warmup"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    err_lines: list[bytes] = []
    drain = threading.Thread(target=lambda: err_lines.extend(proc.stderr or []), daemon=True)
    drain.start()
    seen = b""
    while len(seen) < after_bytes:
        chunk = proc.stdout.read1(256)  # type: ignore[attr-defined]
        if not chunk:
            break
        seen += chunk
    servers.kill(victim)
    try:
        proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        return False, "hung after the kill (killed after 120 s)"
    drain.join(timeout=5)
    rc = proc.returncode
    errors = [b for b in err_lines if b"error" in b.lower() or b"failed" in b.lower()]
    how = f"died of {signal.Signals(-rc).name}" if rc < 0 else f"exit {rc}"
    if errors:
        how += ": " + errors[-1].decode(errors="replace").strip()[:120]
    return rc == 0, how


def summary(rss: Sequence[int]) -> str:
    return " / ".join(f"{r / 1e6:.0f}" for r in rss)
