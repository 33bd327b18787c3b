"""N separate node processes that join by Kademlia bootstrap, measured as a user would.

``python -m simnet.processes --nodes 50`` starts ``--seeds`` seed processes, then the
rest at once, each bootstrapping from the seeds alone (no pre-filled routing tables).
It measures:

- ``join_s``: from the first launch until every node has found every other node's card
  on the DHT (lookups that bypass the local cache);
- ``get_p50_ms``: the median latency of one card lookup, all pairs, after joining;
- ``pss_mb_per_node``: the median proportional set size of a node process at rest;
- churn: kill 20% of the nodes (SIGKILL), start as many fresh ones, and time until every
  live node finds every live card.

With ``--hivemind PYTHON`` (an interpreter whose environment has hivemind; a
benchmark-only install, never a dependency) the same measures run on hivemind's DHT in
the same run, and the last line carries the ratios.
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import trio

from benchmarks._report import headline, paired_ratio, ratio_fields, turns

ROOT = Path(__file__).resolve().parent.parent
MAX_LINE = 1 << 20


@dataclass
class Proc:
    """One child process and its JSON-line channel."""

    process: trio.Process
    peer: str = ""
    addr: str = ""
    buffer: bytes = b""
    dead: bool = False
    failed: bool = False  # it exited before it said it was ready
    conns: int = 0  # peers it holds a connection to, as it last said (p2pedge only)

    async def line(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        while b"\n" not in self.buffer:
            chunk = await self.process.stdout.receive_some(65536)
            if not chunk:
                raise RuntimeError(f"process {self.process.pid} ended")
            self.buffer += chunk
            if len(self.buffer) > MAX_LINE:
                raise RuntimeError("child line too long")
        line, self.buffer = self.buffer.split(b"\n", 1)
        parsed: dict[str, Any] = json.loads(line)
        return parsed

    async def ask(self, command: dict[str, Any]) -> dict[str, Any]:
        assert self.process.stdin is not None
        await self.process.stdin.send_all((json.dumps(command) + "\n").encode())
        return await self.line()

    def kill(self) -> None:
        """SIGKILL the child's whole process group, so a helper it started (hivemind's Go
        daemon) dies with it instead of living on as an orphan."""
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass  # the group is gone already

    def cpu_s(self) -> float:
        """CPU seconds (user + system) of the process and its descendants so far."""
        total = 0
        for pid in _tree(self.process.pid):
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue  # exited meanwhile
            total += int(fields[11]) + int(fields[12])
        return total / os.sysconf("SC_CLK_TCK")

    def pss_mb(self) -> float:
        """PSS of the process and all its descendants (hivemind's Go daemon included)."""
        total = 0
        for pid in _tree(self.process.pid):
            try:
                text = Path(f"/proc/{pid}/smaps_rollup").read_text()
            except OSError:
                continue  # exited meanwhile
            for row in text.splitlines():
                if row.startswith("Pss:"):
                    total += int(row.split()[1])
        return total / 1024


def _tree(pid: int) -> list[int]:
    pids, todo = [], [pid]
    while todo:
        current = todo.pop()
        pids.append(current)
        for task in Path(f"/proc/{current}/task").glob("*"):
            try:
                todo += [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                continue
    return pids


@dataclass
class Run:
    """One swarm of processes of one kind (p2pedge or hivemind)."""

    kind: str
    python: str
    root: Path
    procs: list[Proc] = field(default_factory=list)
    count: int = 0

    def command(self, bootstrap: list[str]) -> list[str]:
        self.count += 1
        if self.kind == "hivemind":
            cmd = [self.python, str(ROOT / "simnet" / "_proc_hivemind.py")]
        else:
            data = self.root / f"n{self.count}"
            cmd = [self.python, "-m", "simnet._proc_node", "--data-dir", str(data)]
        for addr in bootstrap:
            cmd += ["--bootstrap", addr]
        return cmd

    async def launch(self, nursery: trio.Nursery, bootstrap: list[str]) -> Proc:
        """Start one child in ``nursery``, which owns it until it exits or is killed."""
        # one machine cache per swarm, fresh: its first node probes onnxruntime's
        # providers and the rest read the answer, as nodes started on one machine do
        env = dict(os.environ, PYTHONPATH=str(ROOT), P2PEDGE_CACHE_DIR=str(self.root / "machine"))
        run = partial(
            trio.run_process,
            self.command(bootstrap),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            check=False,
            env=env,
            cwd=str(ROOT),
            start_new_session=True,  # its own process group: see Proc.kill
        )
        proc = Proc(await nursery.start(run))
        self.procs.append(proc)
        return proc

    @property
    def live(self) -> list[Proc]:
        return [p for p in self.procs if not p.dead]


async def _ready(proc: Proc) -> None:
    """Read the child's hello; one that exits first is left out (and counted)."""
    try:
        hello = await proc.line()
    except RuntimeError:
        proc.dead = proc.failed = True
        return
    proc.peer, proc.addr = hello["ready"], hello["addr"]
    proc.conns = int(hello.get("conns", 0))


async def _converge(run: Run, deadline: float) -> tuple[float, float]:
    """Ask every live node for every live card it lacks, round after round, until all
    are found or ``deadline`` passes; returns the seconds and the fraction found."""
    start = time.perf_counter()
    missing = {p.peer: {q.peer for q in run.live if q is not p} for p in run.live}
    total = sum(len(m) for m in missing.values())
    latencies: list[float] = []
    # rounds are never cut short (a child's answer would be left on its pipe): each
    # lookup has its own timeout, and the deadline is checked between rounds
    while any(missing.values()) and time.perf_counter() - start < deadline:
        async with trio.open_nursery() as nursery:
            for proc in run.live:
                if missing[proc.peer]:
                    nursery.start_soon(_find, proc, missing, latencies)
    found = 1 - sum(len(m) for m in missing.values()) / total if total else 1.0
    return time.perf_counter() - start, found


async def _find(proc: Proc, missing: dict[str, set[str]], latencies: list[float]) -> None:
    reply = await proc.ask({"op": "find", "peers": sorted(missing[proc.peer]), "timeout": 10})
    missing[proc.peer] -= set(reply["found"])
    proc.conns = int(reply.get("conns", 0))
    latencies.extend(reply["ms"])


async def measure(
    run: Run, nodes: int, seeds: int, churn: float, deadline: float
) -> dict[str, float]:
    try:
        return await _measure(run, nodes, seeds, churn, deadline)
    finally:  # whatever happened, no child or grandchild outlives the run
        for proc in run.procs:
            proc.kill()


async def _measure(
    run: Run, nodes: int, seeds: int, churn: float, deadline: float
) -> dict[str, float]:
    async with trio.open_nursery() as nursery:
        start = time.perf_counter()
        first = [await run.launch(nursery, []) for _ in range(seeds)]
        async with trio.open_nursery() as ready:
            for proc in first:
                ready.start_soon(_ready, proc)
        if any(p.failed for p in first):
            raise RuntimeError("a seed exited before it was ready")
        seed_addrs = [p.addr for p in first]
        rest = [await run.launch(nursery, seed_addrs) for _ in range(nodes - seeds)]
        async with trio.open_nursery() as ready:
            for proc in rest:
                ready.start_soon(_ready, proc)
        up_s = time.perf_counter() - start
        up_cpu = sum(p.cpu_s() for p in run.live)
        up_conns = statistics.median(p.conns for p in run.live)
        converged_s, found = await _converge(run, deadline)
        join_s = time.perf_counter() - start
        join_cpu = sum(p.cpu_s() for p in run.live)
        join_conns = statistics.median(p.conns for p in run.live)
        gets = await _all_pairs(run)
        pss = statistics.median(p.pss_mb() for p in run.live)
        # churn: kill a fifth (never the seeds), start as many fresh nodes
        victims = run.live[seeds:][: max(1, int(nodes * churn))]
        for proc in victims:
            proc.kill()
            proc.dead = True
        churn_start = time.perf_counter()
        fresh = [await run.launch(nursery, seed_addrs) for _ in victims]
        async with trio.open_nursery() as ready:
            for proc in fresh:
                ready.start_soon(_ready, proc)
        _, churn_found = await _converge(run, deadline)
        churn_s = time.perf_counter() - churn_start
        for proc in run.live:
            with trio.move_on_after(5):
                assert proc.process.stdin is not None
                await proc.process.stdin.send_all(b'{"op": "quit"}\n')
        with trio.move_on_after(20):
            for proc in run.live:
                await proc.process.wait()
        nursery.cancel_scope.cancel()
    return {
        "up_s": up_s,
        "up_cpu_s": up_cpu,
        "converge_cpu_s": join_cpu - up_cpu,
        "conns_up": up_conns,
        "conns_joined": join_conns,
        "join_s": join_s,
        "converge_s": converged_s,
        "get_p50_ms": statistics.median(gets) if gets else float("nan"),
        "pss_mb": pss,
        "churn_s": churn_s,
        "found": found,  # of all (node, card) pairs, by the deadline
        "churn_found": churn_found,
        "failed_starts": sum(p.failed for p in run.procs),
    }


async def _all_pairs(run: Run) -> list[float]:
    """One lookup of every live card from every live node: the get latencies."""
    latencies: list[float] = []
    missing = {p.peer: {q.peer for q in run.live if q is not p} for p in run.live}
    async with trio.open_nursery() as nursery:
        for proc in run.live:
            nursery.start_soon(_find, proc, missing, latencies)
    return latencies


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m simnet.processes", description=__doc__)
    parser.add_argument("--nodes", type=int, default=50)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--churn", type=float, default=0.2)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--deadline", type=float, default=600.0)
    parser.add_argument("--hivemind", default=None, metavar="PYTHON")
    args = parser.parse_args()
    # p2pedge is installed editable, so no bytecode was compiled at install as pip does
    # for hivemind's wheels, and where PYTHONDONTWRITEBYTECODE is set (as on CI machines)
    # every node would compile p2pedge's sources at start: 0.3 s of CPU per process here
    for package in ("p2pedge", "simnet"):
        compileall.compile_dir(ROOT / package, quiet=2)
    sides = ["p2pedge"] + (["hivemind"] if args.hivemind else [])
    results: dict[str, list[dict[str, float]]] = {side: [] for side in sides}
    root = Path(tempfile.mkdtemp(prefix="simnet-proc-"))
    try:
        for index in range(args.rounds):
            for side in turns(sides, index):
                python = args.hivemind if side == "hivemind" else sys.executable
                run = Run(side, python, root / f"{side}{index}")
                figures = trio.run(measure, run, args.nodes, args.seeds, args.churn, args.deadline)
                results[side].append(figures)
                print(f"round {index + 1} {side}: {json.dumps(_rounded(figures))}", flush=True)
    except KeyboardInterrupt:
        return
    finally:
        shutil.rmtree(root, ignore_errors=True)
    ours = results["p2pedge"]
    n = args.nodes
    fields = {
        f"join_s_{n}proc": f"{statistics.median(r['join_s'] for r in ours):.1f}",
        f"get_p50_ms_{n}proc": f"{statistics.median(r['get_p50_ms'] for r in ours):.1f}",
        "pss_mb_per_node": f"{statistics.median(r['pss_mb'] for r in ours):.0f}",
        "churn_s": f"{statistics.median(r['churn_s'] for r in ours):.1f}",
        "found": f"{min(r['found'] for r in ours):.3f}",
        "churn_found": f"{min(r['churn_found'] for r in ours):.3f}",
        "failed_starts": f"{sum(r['failed_starts'] for r in ours):.0f}",
    }
    if args.hivemind:
        theirs = results["hivemind"]
        fields["hivemind_found"] = f"{min(r['found'] for r in theirs):.3f}"
        fields["hivemind_failed_starts"] = f"{sum(r['failed_starts'] for r in theirs):.0f}"
        get = paired_ratio([r["get_p50_ms"] for r in ours], [r["get_p50_ms"] for r in theirs])
        fields |= join_fields(ours, theirs)
        fields |= ratio_fields("vs_hivemind_get", get)
    else:
        fields |= {"vs_hivemind_join": "n/a", "vs_hivemind_get": "n/a"}
    print(headline(fields))


def join_fields(ours: list[dict[str, float]], theirs: list[dict[str, float]]) -> dict[str, str]:
    """The join ratio over the rounds where both sides found every card: a side that
    missed some stopped at the deadline, and its time there is no join time."""
    whole = [(a, b) for a, b in zip(ours, theirs, strict=True) if a["found"] == b["found"] == 1]
    fields = {"join_rounds": f"{len(whole)}/{len(ours)}"}
    if not whole:
        return fields | {"vs_hivemind_join": "n/a"}
    join = paired_ratio([a["join_s"] for a, _ in whole], [b["join_s"] for _, b in whole])
    return fields | ratio_fields("vs_hivemind_join", join)


def _rounded(figures: dict[str, float]) -> dict[str, float]:
    return {key: round(value, 2) for key, value in figures.items()}


if __name__ == "__main__":
    main()
