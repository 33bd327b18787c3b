"""Run fuzz targets: each in its own subprocess, bounded in memory, time per input and time.

``python -m fuzz [--inputs N] [--seed S] [--jobs J] [--targets a,b]`` prints one line per
target, one per distinct crash (with the file holding its reproducer), and last
``crashes=N``: the number of distinct crashes (exception type and place). A crash is any
exception the decoder does not document, a hang past ``--per-input-s`` or a target that
runs out of memory (``RLIMIT_AS`` of ``--mem-mb``) or past ``--budget-s``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import mmap
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import zlib
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from fuzz.mutators import Mutator
from fuzz.targets import TARGETS, Harness

CURRENT_BYTES = 4 << 20  # the input being run, kept in a shared file for post-mortems
ROOT = Path(__file__).resolve().parent.parent


class InputHang(BaseException):
    """Raised by the alarm when one input runs past its time."""


@dataclass
class Crash:
    signature: str
    count: int
    example: str  # path of the first input that gave it
    detail: str  # its traceback


@dataclass
class Summary:
    target: str
    inputs: int = 0
    seconds: float = 0.0
    crashes: dict[str, Crash] = field(default_factory=dict)
    rejected_samples: list[int] = field(default_factory=list)  # good samples refused
    note: str = ""


def signature(exc: BaseException) -> str:
    """Exception type plus the innermost frame in our code (not in a library)."""
    place = "?"
    for frame in traceback.extract_tb(exc.__traceback__):
        path = Path(frame.filename)
        if ROOT in path.parents and ".venv" not in path.parts:
            place = f"{path.relative_to(ROOT)}:{frame.lineno}"
    return f"{type(exc).__name__} at {place}"


class _Current:
    """The input now running, in a memory-mapped file the parent reads after a kill."""

    def __init__(self, path: Path) -> None:
        path.write_bytes(b"\0" * (CURRENT_BYTES + 8))
        self._handle = open(path, "r+b")
        self.map = mmap.mmap(self._handle.fileno(), 0)

    def set(self, data: bytes) -> None:
        kept = data[:CURRENT_BYTES]
        self.map[8 : 8 + len(kept)] = kept
        self.map[:8] = len(kept).to_bytes(8, "little")

    @staticmethod
    def read(path: Path) -> bytes:
        raw = path.read_bytes() if path.exists() else b""
        return raw[8 : 8 + int.from_bytes(raw[:8] or b"\0", "little")]


def _record(summary: Summary, out: Path, exc: BaseException, data: bytes) -> None:
    sig = signature(exc)
    crash = summary.crashes.get(sig)
    if crash is not None:
        crash.count += 1
        return
    digest = hashlib.sha1(f"{summary.target} {sig}".encode()).hexdigest()[:12]
    example = out / f"{summary.target}-{digest}.bin"
    example.write_bytes(data)
    detail = "".join(traceback.format_exception(exc))[-4000:]
    example.with_suffix(".txt").write_text(f"{sig}\n\n{detail}")
    summary.crashes[sig] = Crash(sig, 1, str(example), detail)


def _inputs(harness: Harness, seed: int, name: str, count: int) -> Iterator[bytes]:
    mutate = Mutator(seed ^ zlib.crc32(name.encode()), harness.samples)
    for _ in range(count):
        yield mutate()


def run_target(
    name: str,
    inputs: int,
    seed: int,
    out: Path,
    *,
    per_input_s: float = 2.0,
    budget_s: float = 600.0,
) -> Summary:
    """Fuzz one target in this process (the smoke test calls this directly)."""
    out.mkdir(parents=True, exist_ok=True)
    summary = Summary(name)
    current = _Current(out / f"{name}.current")
    shm = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None  # targets that write files
    with tempfile.TemporaryDirectory(prefix=f"fuzz-{name}-", dir=shm) as scratch:
        harness = TARGETS[name](Path(scratch))

        def on_alarm(signum: int, frame: FrameType | None) -> None:
            raise InputHang(f"input ran past {per_input_s} s")

        previous = signal.signal(signal.SIGALRM, on_alarm)
        started = time.monotonic()
        try:
            for index, sample in enumerate(harness.samples):
                if sample.good and _accepts(harness, sample.data, per_input_s) is False:
                    summary.rejected_samples.append(index)
            if harness.acheck is not None:
                _run_async(harness, summary, current, out, seed, inputs, per_input_s, budget_s)
            else:
                _run_sync(harness, summary, current, out, seed, inputs, per_input_s, budget_s)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
        summary.seconds = time.monotonic() - started
    return summary


def _accepts(harness: Harness, data: bytes, per_input_s: float) -> bool | None:
    """Whether a known-good sample decodes (``None``: it crashed; the run reports that)."""
    import trio

    signal.setitimer(signal.ITIMER_REAL, per_input_s)
    try:
        if harness.acheck is not None:
            trio.run(harness.acheck, data)
        elif harness.check is not None:
            harness.check(data)
    except harness.allowed:
        return False
    except (Exception, InputHang):
        return None
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    return True


def _run_sync(
    harness: Harness,
    summary: Summary,
    current: _Current,
    out: Path,
    seed: int,
    inputs: int,
    per_input_s: float,
    budget_s: float,
) -> None:
    check = harness.check
    assert check is not None
    deadline = time.monotonic() + budget_s
    for data in _inputs(harness, seed, summary.target, inputs):
        current.set(data)
        signal.setitimer(signal.ITIMER_REAL, per_input_s)
        try:
            check(data)
        except harness.allowed:
            pass
        except (Exception, InputHang) as exc:
            _record(summary, out, exc, data)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        summary.inputs += 1
        if summary.inputs % 1000 == 0 and time.monotonic() > deadline:
            summary.note = f"stopped by the {budget_s:.0f} s budget"
            return


def _run_async(
    harness: Harness,
    summary: Summary,
    current: _Current,
    out: Path,
    seed: int,
    inputs: int,
    per_input_s: float,
    budget_s: float,
) -> None:
    import trio

    acheck = harness.acheck
    assert acheck is not None

    async def loop() -> None:
        deadline = time.monotonic() + budget_s
        for data in _inputs(harness, seed, summary.target, inputs):
            current.set(data)
            try:
                with trio.fail_after(per_input_s):
                    await acheck(data)
            except harness.allowed:
                pass
            except Exception as exc:
                _record(summary, out, exc, data)
            summary.inputs += 1
            if summary.inputs % 1000 == 0 and time.monotonic() > deadline:
                summary.note = f"stopped by the {budget_s:.0f} s budget"
                return

    # a hang inside a blocking call that trio cannot cancel still ends at the alarm
    signal.setitimer(signal.ITIMER_REAL, budget_s + 60)
    try:
        trio.run(loop)
    except InputHang as exc:
        _record(summary, out, exc, _Current.read(out / f"{summary.target}.current"))


# -- the parent: one bounded subprocess per target ------------------------------------------


def _limit_memory(mem_mb: int) -> Callable[[], None]:
    def apply() -> None:
        limit = mem_mb << 20
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    return apply


def _worker(args: argparse.Namespace) -> int:
    summary = run_target(
        args.worker,
        args.inputs,
        args.seed,
        Path(args.out),
        per_input_s=args.per_input_s,
        budget_s=args.budget_s,
    )
    print(json.dumps(asdict(summary)))
    return 0


def _spawn(name: str, args: argparse.Namespace) -> subprocess.Popen[str]:
    command = [sys.executable, "-m", "fuzz", "--worker", name, "--inputs", str(args.inputs)]
    command += ["--seed", str(args.seed), "--out", args.out]
    command += ["--per-input-s", str(args.per_input_s), "--budget-s", str(args.budget_s)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    return subprocess.Popen(
        command,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_limit_memory(args.mem_mb),
    )


def _collect(name: str, proc: subprocess.Popen[str], args: argparse.Namespace) -> Summary:
    try:
        stdout, stderr = proc.communicate(timeout=args.budget_s + 120)
    except subprocess.TimeoutExpired:
        proc.kill()
        stdout, stderr = proc.communicate()
    lines = stdout.strip().splitlines()
    if proc.returncode == 0 and lines:
        raw: dict[str, Any] = json.loads(lines[-1])
        crashes = {k: Crash(**v) for k, v in raw.pop("crashes").items()}
        return Summary(**raw, crashes=crashes)
    summary = Summary(name, note=f"worker died (exit {proc.returncode})")
    data = _Current.read(Path(args.out) / f"{name}.current")
    example = Path(args.out) / f"{name}-died.bin"
    example.write_bytes(data)
    why = "out of memory or killed" if proc.returncode else "no summary"
    sig = f"WorkerDied ({why}, exit {proc.returncode})"
    summary.crashes[sig] = Crash(sig, 1, str(example), stderr[-4000:])
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fuzz", description=__doc__)
    parser.add_argument("--inputs", type=int, default=100_000, help="inputs per target")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--targets", default=",".join(TARGETS))
    parser.add_argument("--mem-mb", type=int, default=3072, help="address space per target")
    parser.add_argument("--per-input-s", type=float, default=2.0)
    parser.add_argument("--budget-s", type=float, default=240.0, help="wall time per target")
    parser.add_argument("--out", default=str(ROOT / ".cache" / "fuzz"))
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return _worker(args)
    names = [n for n in args.targets.split(",") if n]
    unknown = sorted(set(names) - set(TARGETS))
    if unknown:
        parser.error(f"unknown targets {unknown}; known: {sorted(TARGETS)}")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    pending, done = list(names), []
    running: list[tuple[str, subprocess.Popen[str]]] = []
    while pending or running:
        while pending and len(running) < args.jobs:
            name = pending.pop(0)
            running.append((name, _spawn(name, args)))
        name, proc = running.pop(0)
        summary = _collect(name, proc, args)
        done.append(summary)
        _report(summary)
    distinct = sum(len(s.crashes) for s in done)
    total = sum(s.inputs for s in done)
    print(f"# {total} inputs over {len(done)} targets in {time.monotonic() - started:.0f} s")
    print(f"crashes={distinct}")
    return 1 if distinct else 0


def _report(summary: Summary) -> None:
    rate = summary.inputs / summary.seconds if summary.seconds else 0.0
    line = f"{summary.target:<18} inputs={summary.inputs:<7} crashes={len(summary.crashes)}"
    line += f" ({sum(c.count for c in summary.crashes.values())} inputs)"
    print(f"{line} {summary.seconds:6.1f} s {rate:7.0f}/s {summary.note}".rstrip(), flush=True)
    if summary.rejected_samples:
        print(f"  warning: known-good samples {summary.rejected_samples} were refused")
    for crash in summary.crashes.values():
        print(f"  {crash.signature} x{crash.count}: {crash.example}")
        if crash.signature.startswith("WorkerDied"):
            print("    " + "\n    ".join(crash.detail.strip().splitlines()[-6:]))
