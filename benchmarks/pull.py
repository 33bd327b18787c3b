"""Pull throughput: the registry (HTTP) against 1 and 3 peers over their direct lanes, and
3 peers over libp2p streams (the fallback path); and what a shard server fetches from 1
peer for the middle third of SmolLM2 (blocks 10-20) against the whole model.

Each pull of a round brings two things into a fresh store: the whole SmolLM2-135M
directory and the files a shard server of the synthetic 1B-shape model (``big1b``, see
``benchmarks/big.py``) reads for blocks 8-15 (``shard_files``). Every pull does the full
work: manifest check, ranged fetches, per-chunk sha256, durable commit to ``partial/``,
assembly into blobs.

Every server runs in its own process on loopback: the registry (hypercorn, the same
``serve_registry`` as ``python -m p2pedge.registry serve``) and each peer (a real
``Node`` whose store holds both models, serving blobs on libp2p and on its direct lane);
the puller is a ``Node`` in this process. So a peer's encryption and disk reads run on
its own CPU, as the registry's do on its own. A peer pull uses what a node uses: one
``PeerChunkSource`` per peer, its streams opened through ``node.lanes`` (TLS 1.3 done by
OpenSSL) or, for the libp2p row, through ``node.open_stream`` (Noise and yamux in Python).
Before the timed rounds every server has hashed its blobs once (the registry through one
untimed pull), so no round pays a first verification. Each round pulls from every setup,
the order rotating per round; every ratio is the median of the paired per-round ratios,
with its min-max spread.

Run ``make model`` first (``benchmarks/big.py`` writes ``big1b`` under ``.cache/big`` on
first use), then ``python benchmarks/pull.py [--rounds R] [--chunk-mib N] [--no-doc]``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import trio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks._report import (  # noqa: E402
    RATIO_DEFINITION,
    headline,
    machine,
    paired_ratio,
    ratio_cell,
    ratio_fields,
    turns,
)
from benchmarks._report import write_section as write_doc_section  # noqa: E402
from p2pedge.ids import LayerRange, ModelId  # noqa: E402
from p2pedge.models.convert.shards import shard_files  # noqa: E402
from p2pedge.models.keys import TrustStore, generate_key, public_key_hex  # noqa: E402
from p2pedge.models.pull import PullResult, pull  # noqa: E402
from p2pedge.models.sources import ChunkSource  # noqa: E402
from p2pedge.models.store import Store  # noqa: E402
from p2pedge.node.config import NodeConfig, Tuning  # noqa: E402
from p2pedge.node.node import Node  # noqa: E402
from p2pedge.protocols.blob.handler import PeerChunkSource  # noqa: E402
from p2pedge.registry.client import RegistryClient  # noqa: E402
from p2pedge.registry.server import serve_registry  # noqa: E402

SECTION = "pull"
SMALL = ModelId("smollm2-135m-instruct", "bench")
BIG = ModelId("big1b", "bench")
SHARD = LayerRange(10, 20)  # SmolLM2's middle third, for the shard-vs-whole table
BIG_SHARD = LayerRange(8, 15)  # big1b's middle server in benchmarks/big.py
SETUPS = ("registry", "peers1", "peers3", "libp2p3")
TITLES = {
    "registry": "registry (HTTP, own process)",
    "peers1": "1 peer (direct lane, own process)",
    "peers3": "3 peers (direct lanes, a process each)",
    "libp2p3": "3 peers (libp2p streams: the fallback path)",
}


@dataclass(frozen=True)
class Work:
    """What one pull of a round brings: each model with the files it selects (None: all)."""

    parts: tuple[tuple[ModelId, tuple[str, ...] | None], ...]


def quiet_config(data_dir: Path) -> NodeConfig:
    return NodeConfig(
        data_dir=data_dir, tuning=Tuning(measure_compute=False, announce_on_start=False)
    )


# -- child processes -----------------------------------------------------------------------


async def serve_peer(root: Path, data_dir: Path) -> None:
    """A peer: a Node whose store is ``root``; prints its address once its blobs are hashed."""
    config = NodeConfig(data_dir=data_dir, models_dir=root, tuning=quiet_config(data_dir).tuning)
    async with Node(config) as node:
        store = node.models.store
        await trio.to_thread.run_sync(lambda: [store.verify_blob(d) for d in store.blob_digests()])
        print(json.dumps({"peer_id": node.peer_id, "addr": node.addrs[0]}), flush=True)
        await trio.sleep_forever()


async def serve_http(root: Path) -> None:
    async with trio.open_nursery() as nursery:
        port = await nursery.start(partial(serve_registry, root))
        print(json.dumps({"port": port}), flush=True)


def child_main(args: argparse.Namespace) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        if args.child == "peer":
            trio.run(serve_peer, Path(args.root), Path(args.data_dir))
        else:
            trio.run(serve_http, Path(args.root))
    except KeyboardInterrupt:
        pass


@contextmanager
def children(root: Path, work: Path, peers: int) -> Iterator[list[dict[str, object]]]:
    """The registry's process, then each peer's; their JSON hello lines, in that order."""
    procs: list[subprocess.Popen[bytes]] = []
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    try:
        argv = [sys.executable, __file__, "--root", str(root)]
        commands = [[*argv, "--child", "registry"]]
        for i in range(peers):
            commands.append([*argv, "--child", "peer", "--data-dir", str(work / f"peer{i}")])
        for i, cmd in enumerate(commands):
            with (logs / f"child{i}.log").open("wb") as err:
                procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err))
        hellos = []
        for i, proc in enumerate(procs):
            assert proc.stdout is not None
            line = proc.stdout.readline()  # harness setup: nothing else runs yet
            if not line:
                tail = (logs / f"child{i}.log").read_text()[-2000:]
                raise SystemExit(f"server process {i} failed:\n{tail}")
            hellos.append({**json.loads(line), "pid": proc.pid})
        yield hellos
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=30)


# -- the measured side ---------------------------------------------------------------------


def cpu_seconds(pid: int | None = None) -> float:
    """CPU time (user + system, every thread) of this process or of child ``pid``."""
    if pid is None:
        times = os.times()
        return times.user + times.system
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def seed_store(root: Path, chunk: int) -> tuple[TrustStore, Work, Work, float]:
    """Both models signed into one store; the round's work, the shard row's work, and the
    big model's size in MB."""
    from benchmarks.big import MODELS, ensure_model
    from p2pedge.testing import real_model_dir

    try:
        small_dir = real_model_dir()
    except BaseException as exc:  # real_model_dir() pytest-skips when the model is missing
        raise SystemExit(f"real model missing ({exc}); run `make model`") from exc
    _, big_dir = ensure_model(ROOT / ".cache" / "big", MODELS["1b"])
    key = generate_key()
    store = Store(root)
    for model, directory in ((SMALL, small_dir), (BIG, big_dir)):
        store.add_model_dir(directory, model.name, model.version, "llm", key, chunk_size=chunk)
    big_files = tuple(shard_files(big_dir, BIG_SHARD))
    big_mb = sum(f.size for f in store.get_manifest(BIG).select(big_files)) / 1e6
    rounds = Work(((SMALL, None), (BIG, big_files)))
    shard = Work(((SMALL, tuple(shard_files(small_dir, SHARD))),))
    return TrustStore([public_key_hex(key)]), rounds, shard, big_mb


async def timed(
    work: Path, sources: Sequence[ChunkSource], trust: TrustStore, what: Work, per_source: int
) -> tuple[float, float, list[PullResult]]:
    """(MB, seconds, results) of pulling ``what`` into a fresh store."""
    target = work / "pulled"
    shutil.rmtree(target, ignore_errors=True)
    results = []
    started = time.perf_counter()
    for model, files in what.parts:
        store = Store(target)
        result = await pull(
            model, store, sources, trust, files=files, per_source=per_source, progress=False
        )
        results.append(result)
    seconds = time.perf_counter() - started
    await trio.to_thread.run_sync(partial(shutil.rmtree, target, ignore_errors=True))
    return sum(r.fetched_bytes for r in results) / 1e6, seconds, results


@dataclass
class Measured:
    rates: dict[str, list[float]]  # MB/s of the round's work, per setup
    cpu: dict[str, list[tuple[float, float]]]  # CPU ms per MB: (puller, every server)
    small_rates: dict[str, list[float]]  # of its SmolLM2 part
    big_rates: dict[str, list[float]]  # of its big1b shard part
    shard: dict[str, list[float]]
    mb: float
    big_mb: float
    lane_fallbacks: int
    lanes_opened: int


async def measure(args: argparse.Namespace, work: Path) -> Measured:
    seed = work / "seed"
    trust, rounds, shard_work, big_mb = await trio.to_thread.run_sync(
        seed_store, seed, args.chunk_mib << 20
    )
    print(f"seeded {seed} (big1b blocks {BIG_SHARD}: {big_mb:.1f} MB)", file=sys.stderr)
    m = Measured({s: [] for s in SETUPS}, {s: [] for s in SETUPS}, {s: [] for s in SETUPS},
                 {s: [] for s in SETUPS},
                 {"whole_s": [], "shard_s": [], "whole_mb": [], "shard_mb": []}, 0.0, big_mb,
                 0, 0)  # fmt: skip
    with children(seed, work, 3) as hellos:
        registry_port = hellos[0]["port"]
        peers = hellos[1:]
        pids = [int(str(h["pid"])) for h in hellos]
        async with (
            Node(quiet_config(work / "puller")) as puller,
            RegistryClient(f"http://127.0.0.1:{registry_port}") as registry,
        ):
            for hello in peers:
                await puller.connect(str(hello["addr"]))
            ids = [str(h["peer_id"]) for h in peers]

            def sources(label: str) -> list[ChunkSource]:
                if label == "registry":
                    return [registry]
                lanes = None if label == "libp2p3" else puller.lanes
                chosen = ids[:1] if label == "peers1" else ids
                return [PeerChunkSource.for_node(puller, p, lanes=lanes) for p in chosen]

            async def run(
                label: str, what: Work, record: bool = True
            ) -> tuple[float, float, list[PullResult]]:
                chosen = sources(label)
                own, servers = cpu_seconds(), sum(cpu_seconds(p) for p in pids)
                try:
                    mb, seconds, results = await timed(work, chosen, trust, what, args.per_source)
                finally:
                    for source in chosen:
                        if isinstance(source, PeerChunkSource):
                            await source.aclose()
                own = cpu_seconds() - own
                servers = sum(cpu_seconds(p) for p in pids) - servers
                if record and what is rounds:
                    m.cpu[label].append((own * 1e3 / mb, servers * 1e3 / mb))
                return mb, seconds, results

            await run(
                "registry", rounds, record=False
            )  # untimed: the registry hashes each blob once
            for r in range(args.rounds):
                for label in turns([*SETUPS, "shard"], r):
                    if label == "shard":
                        mb, seconds, _ = await run("peers1", shard_work)
                        m.shard["shard_s"].append(seconds)
                        m.shard["shard_mb"].append(mb)
                        continue
                    mb, seconds, results = await run(label, rounds)
                    m.mb = mb
                    m.rates[label].append(mb / seconds)
                    small, big = results
                    m.small_rates[label].append(small.fetched_bytes / 1e6 / small.seconds)
                    m.big_rates[label].append(big.fetched_bytes / 1e6 / big.seconds)
                    if label == "peers1":
                        m.shard["whole_s"].append(small.seconds)
                        m.shard["whole_mb"].append(small.fetched_bytes / 1e6)
                    own, servers = m.cpu[label][-1]
                    hedged = sum(res.hedged for res in results)
                    dropped = sorted({d for res in results for d in res.dropped.values()})
                    print(
                        f"round {r + 1} {label:8s} {seconds:6.2f} s {mb / seconds:7.1f} MB/s, "
                        f"CPU ms/MB: puller {own:.1f}, servers {servers:.1f}; "
                        f"{hedged} hedged, dropped: {dropped}",
                        file=sys.stderr,
                    )
            m.lanes_opened, m.lane_fallbacks = puller.lanes.opened, puller.lanes.fallbacks
    return m


def report(args: argparse.Namespace, m: Measured) -> None:
    vs = {s: paired_ratio(m.rates[s], m.rates["registry"]) for s in SETUPS}
    med = {s: statistics.median(m.rates[s]) for s in SETUPS}
    rows = [
        "| source | SmolLM2 MB/s | big1b shard MB/s | both MB/s | vs registry (min-max) "
        "| CPU ms/MB: puller, servers |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for s in SETUPS:
        cell = "baseline" if s == "registry" else ratio_cell(vs[s])
        small, big = statistics.median(m.small_rates[s]), statistics.median(m.big_rates[s])
        own = statistics.median(c[0] for c in m.cpu[s])
        servers = statistics.median(c[1] for c in m.cpu[s])
        rows.append(
            f"| {TITLES[s]} | {small:.1f} | {big:.1f} | {med[s]:.1f} | {cell} "
            f"| {own:.1f}, {servers:.1f} |"
        )
    table = "\n".join(rows)
    print(table)
    whole_s, shard_s = statistics.median(m.shard["whole_s"]), statistics.median(m.shard["shard_s"])
    whole_mb, shard_mb = m.shard["whole_mb"][0], m.shard["shard_mb"][0]
    shard_time = paired_ratio(m.shard["shard_s"], m.shard["whole_s"])
    shard_table = "\n".join(
        [
            "| pulled from 1 peer (lane) | MB | median s | vs whole model (time: min-max) |",
            "|---|---:|---:|---:|",
            f"| whole SmolLM2 | {whole_mb:.1f} | {whole_s:.2f} | 1.00x |",
            f"| shard server's files for blocks {SHARD} | {shard_mb:.1f} | {shard_s:.2f} | "
            f"{ratio_cell(shard_time)} time, {shard_mb / whole_mb:.2f}x bytes |",
        ]
    )
    print(shard_table)
    lanes = f"{m.lanes_opened} lane streams opened, {m.lane_fallbacks} fell back to libp2p"
    print(lanes, file=sys.stderr)
    if not args.no_doc:
        write_doc_section(
            SECTION,
            f"### Model pull (`benchmarks/pull.py`)\n\n{machine()}. Each pull brings the "
            f"whole SmolLM2-135M-Instruct lossless-4 dir and big1b's files for blocks "
            f"{BIG_SHARD} ({m.mb:.0f} MB in all, {m.big_mb:.0f} MB of it big1b's), "
            f"{args.chunk_mib} MiB chunks, {args.per_source} streams per source, "
            f"{args.rounds} interleaved rounds on loopback; the registry and every peer in "
            f"a process of its own, the puller a Node in another ({lanes}). "
            f"{RATIO_DEFINITION}\n\n{table}\n\n"
            "The direct lane carries blob chunks in TLS 1.3 done by OpenSSL; over libp2p the "
            "same chunks pass through py-libp2p's Noise and yamux, written in Python, which "
            "is where the old gap to HTTP came from. On this machine every process shares 2 "
            "cores and the puller's own work (hashing and durably committing every chunk) "
            "is the same for every source, so extra peers add less than on separate "
            "machines, where each brings its own CPU, disk and uplink.\n\n"
            f"{shard_table}\n\n"
            "A shard server fetches only what building its shard reads (`shard_files`): the "
            "graph, the facts and its blocks' data files; the first and last thirds also "
            "need the embedding table (the last one for its tied head).\n",
        )
    fields = {
        **ratio_fields("peers3_vs_registry", vs["peers3"]),
        **ratio_fields("peers1_vs_registry", vs["peers1"]),
        **ratio_fields("libp2p3_vs_registry", vs["libp2p3"]),
        "registry_mb_s": f"{med['registry']:.1f}",
        "peers1_mb_s": f"{med['peers1']:.1f}",
        "peers3_mb_s": f"{med['peers3']:.1f}",
        "big_mb": f"{m.big_mb:.0f}",
        "lane_fallbacks": str(m.lane_fallbacks),
        **ratio_fields("shard_vs_whole_time", shard_time),
        "shard_vs_whole_bytes": f"{shard_mb / whole_mb:.2f}",
    }
    print(headline(fields))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--chunk-mib", type=int, default=4)
    parser.add_argument("--per-source", type=int, default=4)
    parser.add_argument("--tmp", default=None, help="scratch directory (default: system temp)")
    parser.add_argument("--no-doc", action="store_true", help="do not update docs/benchmarks.md")
    parser.add_argument("--child", choices=("peer", "registry"), help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    parser.add_argument("--data-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child_main(args)
        return
    work = Path(tempfile.mkdtemp(prefix="bench-pull-", dir=args.tmp))
    try:
        measured = trio.run(measure, args, work)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report(args, measured)


if __name__ == "__main__":
    main()
