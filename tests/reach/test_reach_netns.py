"""The namespace lab cleans up after itself, and after a crashed run before it."""

from __future__ import annotations

import subprocess

import pytest

from p2pedge.testing.netns import PREFIX, Lab, NetnsUnavailable, sweep_stale, unavailable_reason


def namespaces() -> set[str]:
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    return {line.split(" ")[0] for line in listed.stdout.splitlines() if line}


@pytest.fixture(autouse=True)
def need_namespaces() -> None:
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(reason)


def test_lab_removes_its_namespaces_even_when_the_body_fails() -> None:
    with pytest.raises(RuntimeError), Lab() as lab:
        home = lab.home("h")
        made = set(lab.namespaces)
        assert {home.host, home.router, lab.inet} <= made <= namespaces()
        raise RuntimeError("a failing test")
    assert not made & namespaces()


def test_stale_namespaces_of_dead_runs_are_swept() -> None:
    dead = f"{PREFIX}-999999999-dead-inet"  # no process has this id
    subprocess.run(["ip", "netns", "add", dead], check=True)
    try:
        assert dead in sweep_stale()
        assert dead not in namespaces()
    finally:
        subprocess.run(["ip", "netns", "del", dead], capture_output=True, check=False)


def test_a_failing_command_says_why() -> None:
    with Lab() as lab, pytest.raises(NetnsUnavailable, match="does-not-exist"):
        lab.ip(lab.inet, "link", "set", "does-not-exist", "up")
