"""``simnet.processes``: separate node processes join by Kademlia bootstrap alone."""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import pytest
import trio

from simnet.processes import Run, join_fields, measure

SPAWNER = """
import json, subprocess, sys, time
helper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
print(json.dumps({"helper": helper.pid}), flush=True)
time.sleep(600)
"""


async def test_three_processes_join_find_every_card_and_survive_churn(tmp_path: Path) -> None:
    run = Run("p2pedge", sys.executable, tmp_path)
    figures = await measure(run, nodes=3, seeds=1, churn=0.34, deadline=120)
    # every live node found every live card, before and after one node was killed and
    # replaced (the killed one is left out of `live`)
    assert len(run.procs) == 4 and len(run.live) == 3
    assert all(p.process.returncode is not None for p in run.procs)
    assert figures["found"] == 1.0 and figures["churn_found"] == 1.0
    assert figures["failed_starts"] == 0
    assert 0 < figures["join_s"] < 120 and 0 < figures["churn_s"] < 120
    assert math.isfinite(figures["get_p50_ms"]) and figures["get_p50_ms"] >= 0
    assert 20 < figures["pss_mb"] < 1000  # a real Python node, measured from /proc
    # CPU from /proc: three interpreters that imported libp2p; connections as nodes report
    assert 3 * 0.3 < figures["up_cpu_s"] < 3 * 20 and figures["converge_cpu_s"] >= 0
    assert 1 <= figures["conns_up"] <= 2 and 1 <= figures["conns_joined"] <= 2


async def test_a_killed_child_takes_its_helpers_along(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # hivemind's nodes start a Go daemon each; a churn victim's must die with it
    run = Run("p2pedge", sys.executable, tmp_path)
    monkeypatch.setattr(run, "command", lambda _bootstrap: [sys.executable, "-c", SPAWNER])
    async with trio.open_nursery() as nursery:
        proc = await run.launch(nursery, [])
        helper = os.pidfd_open(int((await proc.line())["helper"]))
        try:
            proc.kill()
            with trio.fail_after(10):
                await trio.lowlevel.wait_readable(helper)  # readable once it has exited
        finally:
            os.close(helper)
        nursery.cancel_scope.cancel()


def test_the_join_ratio_pairs_only_rounds_where_both_sides_found_every_card() -> None:
    ours = [{"join_s": 70.0, "found": 1.0}, {"join_s": 75.0, "found": 1.0}]
    theirs = [{"join_s": 140.0, "found": 1.0}, {"join_s": 380.0, "found": 0.98}]
    fields = join_fields(ours, theirs)
    assert fields["join_rounds"] == "1/2" and fields["vs_hivemind_join"] == "0.50"
    missed = [{"join_s": 300.0, "found": 0.9}, {"join_s": 300.0, "found": 0.9}]
    assert join_fields(missed, theirs) == {"join_rounds": "0/2", "vs_hivemind_join": "n/a"}
