"""Namespace labs for the reach tests: skipped only where namespaces cannot exist."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator

import pytest

from p2pedge.testing.netns import Lab, Proc, unavailable_reason

DRIVER = [sys.executable, "-m", "p2pedge.testing.reach_driver"]
Start = Callable[..., Proc]


@pytest.fixture
def lab() -> Iterator[Lab]:
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    with Lab() as made:
        yield made


@pytest.fixture
def start_node(lab: Lab) -> Iterator[Start]:
    """Start a reach driver inside a namespace (``proc.expect("ready")`` waits for it);
    every one must exit 0 when its stdin closes."""
    procs: list[Proc] = []

    def start(ns: str, *args: str) -> Proc:
        proc = lab.spawn(ns, [*DRIVER, *args])
        procs.append(proc)
        return proc

    yield start
    codes = [proc.stop() for proc in procs]
    assert all(code == 0 for code in codes), [p.stderr_tail() for p in procs]
