"""``p2pedge chat`` and ``p2pedge run`` as a user meets them: a real process on a
pseudo-terminal (its controlling terminal, so Ctrl-C is the byte \\x03 the user types)."""

from __future__ import annotations

import fcntl
import os
import select
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

from p2pedge.testing import build_tiny_model, real_model_dir

DEADLINE_S = 60.0


class Terminal:
    """A child process on a pty; ``expect`` reads until a text appears or a deadline."""

    def __init__(self, argv: list[str], cwd: Path) -> None:
        self.master, slave = os.openpty()

        def controlling_tty() -> None:  # runs in the child, after setsid
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)

        self.proc = subprocess.Popen(
            [sys.executable, "-m", "p2pedge.cli", *argv],
            stdin=slave, stdout=slave, stderr=slave, cwd=cwd,
            start_new_session=True, preexec_fn=controlling_tty,
        )  # fmt: skip
        os.close(slave)
        self.seen = ""

    def expect(self, text: str, after: int = 0) -> int:
        """Read until ``text`` appears past offset ``after``; returns the offset past it."""
        deadline = time.monotonic() + DEADLINE_S
        while (at := self.seen.find(text, after)) < 0:
            left = deadline - time.monotonic()
            assert left > 0, f"no {text!r} within {DEADLINE_S} s; got {self.seen!r}"
            if not self._read(left):
                raise AssertionError(f"output ended before {text!r}: {self.seen!r}")
        return at + len(text)

    def _read(self, timeout: float) -> bool:
        ready, _, _ = select.select([self.master], [], [], timeout)
        if not ready:
            return True
        try:
            data = os.read(self.master, 4096)
        except OSError:  # EIO: every slave end is closed, the child is gone
            return False
        self.seen += data.decode("utf-8", "replace")
        return bool(data)

    def type(self, text: str) -> None:
        os.write(self.master, text.encode())

    def wait(self) -> int:
        deadline = time.monotonic() + DEADLINE_S
        while self._read(max(0.0, deadline - time.monotonic())) and time.monotonic() < deadline:
            pass  # drain until the child closes the terminal
        code = self.proc.wait(timeout=DEADLINE_S)
        os.close(self.master)
        return code


@pytest.mark.real_model
def test_chat_streams_an_answer_resets_and_exits_0_on_ctrl_c(tmp_path: Path) -> None:
    model = real_model_dir()
    term = Terminal(
        ["chat", str(model), "--data-dir", str(tmp_path / "node"), "--max-tokens", "16"], tmp_path
    )
    try:
        at = term.expect(">>> ")
        assert "chatting with smollm2-135m-instruct (local)" in term.seen
        term.type("What is the capital of Japan?\r")  # llama.cpp says Tokyo too
        at = term.expect("Tokyo", at)  # the answer, streamed before the next prompt
        at = term.expect(">>> ", at)
        term.type("/reset\r")
        at = term.expect("(conversation reset)", at)
        term.expect(">>> ", at)
        term.type("\x03")  # Ctrl-C, through the terminal's line discipline: SIGINT
        assert term.wait() == 0
    finally:
        if term.proc.poll() is None:
            term.proc.kill()
    assert "Traceback" not in term.seen, term.seen


def test_chat_leaves_with_0_on_ctrl_d(tmp_path: Path) -> None:
    model = build_tiny_model(tmp_path / "smollm2-135m-instruct", seed=3)
    term = Terminal(["chat", str(model), "--data-dir", str(tmp_path / "node")], tmp_path)
    try:
        term.expect(">>> ")
        term.type("\x04")  # Ctrl-D at the start of a line: end of input
        assert term.wait() == 0
    finally:
        if term.proc.poll() is None:
            term.proc.kill()
    assert "Traceback" not in term.seen, term.seen


def test_chat_without_a_model_says_how_to_get_one(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "p2pedge.cli", "chat", "--data-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=DEADLINE_S, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert out.returncode == 1, out
    assert "p2pedge pull" in out.stderr and "Traceback" not in out.stderr
    assert out.stderr.count("\n") == 1, out.stderr  # one line


def test_usage_errors_are_one_line_and_exit_2() -> None:
    for argv in (
        ["run", "only-a-model"],
        ["chat", "--bogus"],
        ["bogus"],
        ["node", "run", "--bogus"],
        ["registry"],
        ["registry", "serve", "--bogus"],
    ):
        out = subprocess.run(
            [sys.executable, "-m", "p2pedge.cli", *argv],
            capture_output=True, text=True, timeout=DEADLINE_S,
        )  # fmt: skip
        assert out.returncode == 2, (argv, out)
        assert out.stderr.count("\n") == 1 and "error:" in out.stderr, (argv, out.stderr)


@pytest.mark.real_model
def test_run_streams_one_answer_to_stdout(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "p2pedge.cli", "run", str(real_model_dir()),
         "What is the capital of Japan?", "--max-tokens", "12", "--data-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=DEADLINE_S, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert out.returncode == 0, out
    assert "Tokyo" in out.stdout and "Traceback" not in out.stderr


def test_pull_import_and_publish_are_the_longer_commands(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from p2pedge import cli

    for short, usage in (
        ("pull", "p2pedge registry pull"),
        ("import", "p2pedge models import-gguf"),
        ("publish", "p2pedge registry publish"),
    ):
        with pytest.raises(SystemExit) as done:
            cli.main([short, "--help"])
        assert done.value.code == 0
        assert capsys.readouterr().out.startswith(f"usage: {usage} "), short
