"""The registry CLI as a real process: one line when its port is taken, exit 0 on a signal."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest


def spawn(root: Path, listen: str) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-m", "p2pedge.registry", "serve", "--root", str(root)]
    return subprocess.Popen(
        [*cmd, "--listen", listen],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


@pytest.fixture
def held_port() -> Iterator[int]:
    """A loopback port this test holds open, so the registry cannot bind it."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield int(sock.getsockname()[1])


def test_port_taken_is_one_line_and_exit_2(tmp_path: Path, held_port: int) -> None:
    proc = spawn(tmp_path / "root", f"127.0.0.1:{held_port}")
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 2
    assert err.splitlines() == [
        f"error: cannot listen on 127.0.0.1:{held_port}: Address already in use"
    ]
    assert out == ""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_exits_0_without_traceback(tmp_path: Path, sig: signal.Signals) -> None:
    proc = spawn(tmp_path / "root", "127.0.0.1:0")
    assert proc.stderr is not None
    try:
        first = proc.stderr.readline()  # blocks until it listens (or EOF if it died)
        assert first.startswith(f"registry serving {tmp_path / 'root'} on http://127.0.0.1:")
        port = int(first.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=10):
            pass  # it really listens on the port it printed
        proc.send_signal(sig)
        out, rest = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0
    assert rest == ""
    assert out == ""
