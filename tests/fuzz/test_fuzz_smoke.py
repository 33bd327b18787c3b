"""A small ``make fuzz`` inside the suite: 2,000 inputs per decoder, and the runner itself.

Crashes already routed as strict-xfail regression tests (``test_fuzz_regressions.py``) are
tolerated here by their signature; anything else a target raises fails the suite.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from fuzz.mutators import Mutator, Sample
from fuzz.run import ROOT, run_target
from fuzz.targets import TARGETS, Harness

# signature prefixes of known crashes not fixed yet (each a strict xfail in the regressions)
KNOWN: dict[str, tuple[str, ...]] = {}


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_smoke(name: str, tmp_path: Path) -> None:
    summary = run_target(name, 2000, seed=7, out=tmp_path, per_input_s=5.0)
    assert summary.inputs == 2000
    assert not summary.rejected_samples, "a known-good sample no longer decodes"
    new = [s for s in summary.crashes if not s.startswith(KNOWN.get(name, ("\0",)))]
    details = "\n".join(summary.crashes[s].detail for s in new)
    assert not new, f"new fuzz crashes in {name}: {new}\n{details}"


def test_inputs_are_seeded() -> None:
    samples = [Sample(b"\x82\xa1a\x01\xa1b\xc4\x02hi", "msgpack"), Sample(b"raw bytes")]

    def inputs(seed: int) -> list[bytes]:
        mutate = Mutator(seed, samples)
        return [mutate() for _ in range(300)]

    first = inputs(3)
    assert first == inputs(3)
    assert first != inputs(4)
    assert len(set(first)) > 200  # mostly distinct inputs, not one repeated


def test_a_hang_and_an_undocumented_error_are_crashes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def build(scratch: Path) -> Harness:
        def check(data: bytes) -> None:
            if data[:1] == b"h":
                while True:  # a decoder that never returns
                    pass
            if data[:1] == b"k":
                raise KeyError("undocumented")
            raise ValueError("the documented refusal")

        samples = [Sample(b"h" + b"\0" * 8), Sample(b"k" + b"\0" * 8), Sample(b"v" + b"\0" * 8)]
        return Harness(samples, (ValueError,), check)

    monkeypatch.setitem(TARGETS, "test.fake", build)
    started = time.monotonic()
    summary = run_target("test.fake", 40, seed=1, out=tmp_path, per_input_s=0.05)
    kinds = {sig.split()[0] for sig in summary.crashes}
    assert kinds == {"InputHang", "KeyError"}
    assert time.monotonic() - started < 30  # each hang was cut at its alarm
    example = Path(summary.crashes[next(iter(summary.crashes))].example)
    assert example.read_bytes()[:1] in (b"h", b"k")  # the reproducer is kept


def test_cli_runs_targets_in_bounded_subprocesses_and_ends_with_the_count(
    tmp_path: Path,
) -> None:
    command = [sys.executable, "-m", "fuzz", "--inputs", "300", "--jobs", "2", "--out"]
    command += [str(tmp_path), "--targets", "wire.framing,blob.codec", "--mem-mb", "2048"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    lines = done.stdout.strip().splitlines()
    assert lines[-1] == "crashes=0", done.stdout + done.stderr
    assert done.returncode == 0
    assert any(line.startswith("wire.framing") and "inputs=300" in line for line in lines)


def test_cli_reports_a_target_that_runs_out_of_memory(tmp_path: Path) -> None:
    """Under a tiny address space the worker cannot even start: that is a crash, counted."""
    command = [sys.executable, "-m", "fuzz", "--inputs", "10", "--out", str(tmp_path)]
    command += ["--targets", "wire.tensors", "--mem-mb", "64"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    lines = done.stdout.strip().splitlines()
    assert lines[-1] == "crashes=1", done.stdout + done.stderr
    assert "WorkerDied" in done.stdout and done.returncode == 1
