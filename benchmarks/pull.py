"""Pull throughput of the real model directory: registry (HTTP) vs 1 and 3 libp2p peers;
and what a shard server fetches from 1 peer for the middle third (blocks 10-20) against the
whole model.

Every pull goes into a fresh store and does the full work: manifest check, ranged fetches,
per-chunk sha256, durable commit to ``partial/``, assembly into blobs. Registry, peers and
puller all run in this one process on loopback (one trio loop, one GIL), so the figures
are a lower bound for separate machines; the ratio is what compares sources. Each round
pulls from every setup (the order rotating per round); every ratio is the median of the
paired per-round ratios, with its min-max spread.

Run ``make model`` first, then
``python benchmarks/pull.py [--rounds R] [--chunk-mib N] [--no-doc]``.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

import trio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks._report import (  # noqa: E402
    RATIO_DEFINITION,
    headline,
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
from p2pedge.protocols.blob.codec import PROTOCOL_ID  # noqa: E402
from p2pedge.protocols.blob.handler import BlobService, PeerChunkSource  # noqa: E402
from p2pedge.registry.client import RegistryClient  # noqa: E402
from p2pedge.registry.server import serve_registry  # noqa: E402

DOC = ROOT / "docs" / "benchmarks.md"
SECTION = "pull"
MODEL = ModelId("smollm2-135m-instruct", "bench")
SHARD = LayerRange(10, 20)


def model_dir() -> Path:
    try:
        from p2pedge.testing import real_model_dir

        return real_model_dir()
    except BaseException as exc:  # real_model_dir() pytest-skips when the model is missing
        raise SystemExit(f"real model missing ({exc}); run `make model`") from exc


async def timed_pull(
    work: Path,
    label: str,
    sources: list[ChunkSource],
    trust: TrustStore,
    per_source: int,
    files: list[str] | None = None,
) -> PullResult:
    target = work / f"pull-{label}"
    shutil.rmtree(target, ignore_errors=True)
    result = await pull(
        MODEL, Store(target), sources, trust, per_source=per_source, files=files, progress=False
    )
    shutil.rmtree(target, ignore_errors=True)
    return result


async def run(args: argparse.Namespace) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """MB/s per source setup, and (MB, seconds) of whole-model and shard pulls from 1 peer."""
    from simnet import Swarm

    source = model_dir()
    key = generate_key()
    trust = TrustStore([public_key_hex(key)])
    work = Path(tempfile.mkdtemp(prefix="bench-pull-", dir=args.tmp))
    rates: dict[str, list[float]] = {"registry": [], "peers1": [], "peers3": []}
    third = shard_files(source, SHARD)
    shard: dict[str, list[float]] = {"whole_s": [], "shard_s": [], "whole_mb": [], "shard_mb": []}
    try:
        seed = Store(work / "seed")
        chunk = args.chunk_mib * 1024 * 1024
        manifest = await trio.to_thread.run_sync(
            partial(
                seed.add_model_dir, source, MODEL.name, MODEL.version, "llm", key, chunk_size=chunk
            )
        )
        size_mb = manifest.total_size / 1e6
        print(f"model {source} ({size_mb:.1f} MB, {chunk >> 20} MiB chunks)", file=sys.stderr)
        async with trio.open_nursery() as nursery:
            port = await nursery.start(partial(serve_registry, seed.root))
            async with Swarm(4, seed=7) as swarm, RegistryClient(f"http://127.0.0.1:{port}") as reg:
                holders, puller = swarm.nodes[:3], swarm.nodes[3]
                for node in holders:
                    node.set_stream_handler(PROTOCOL_ID, BlobService(Store(seed.root)).handle)
                peers = [PeerChunkSource.for_node(puller, n.peer_id) for n in holders]

                async def pull_shard(round_index: int, peer: ChunkSource) -> None:
                    part = await timed_pull(
                        work, "shard", [peer], trust, args.per_source, files=third
                    )
                    shard["shard_s"].append(part.seconds)
                    shard["shard_mb"].append(part.fetched_bytes / 1e6)
                    print(
                        f"round {round_index + 1} shard {SHARD} {part.seconds:6.2f} s "
                        f"{part.fetched_bytes / 1e6:.1f} MB",
                        file=sys.stderr,
                    )

                setups: dict[str, list[ChunkSource]] = {
                    "registry": [reg],
                    "peers1": [peers[0]],
                    "peers3": list(peers),
                }
                for round_index in range(args.rounds):
                    for label in turns([*setups, "shard"], round_index):
                        if label == "shard":
                            await pull_shard(round_index, peers[0])
                            continue
                        sources = setups[label]
                        result = await timed_pull(work, label, sources, trust, args.per_source)
                        rate = result.fetched_bytes / 1e6 / result.seconds
                        rates[label].append(rate)
                        print(
                            f"round {round_index + 1} {label:8s} {result.seconds:6.2f} s "
                            f"{rate:7.1f} MB/s {result.by_source}",
                            file=sys.stderr,
                        )
                        if label == "peers1":
                            shard["whole_s"].append(result.seconds)
                            shard["whole_mb"].append(result.fetched_bytes / 1e6)
                for peer in peers:
                    await peer.aclose()
            nursery.cancel_scope.cancel()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return rates, shard


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--chunk-mib", type=int, default=4)
    parser.add_argument("--per-source", type=int, default=4)
    parser.add_argument("--tmp", default=None, help="scratch directory (default: system temp)")
    parser.add_argument("--no-doc", action="store_true", help="do not update docs/benchmarks.md")
    args = parser.parse_args()
    rates, shard = trio.run(run, args)
    median = {label: statistics.median(values) for label, values in rates.items()}
    vs_registry = {
        label: paired_ratio(values, rates["registry"]) for label, values in rates.items()
    }
    rows = [
        "| source | median MB/s | vs registry (min-max) |",
        "|---|---:|---:|",
    ]
    for label, title in (
        ("registry", "registry (HTTP)"),
        ("peers1", "1 peer (harness: in the puller's process)"),
        ("peers3", "3 peers (harness: in the puller's process)"),
    ):
        cell = "baseline" if label == "registry" else ratio_cell(vs_registry[label])
        rows.append(f"| {title} | {median[label]:.1f} | {cell} |")
    table = "\n".join(rows)
    print(table)
    whole_s, shard_s = statistics.median(shard["whole_s"]), statistics.median(shard["shard_s"])
    whole_mb, shard_mb = shard["whole_mb"][0], shard["shard_mb"][0]
    shard_time = paired_ratio(shard["shard_s"], shard["whole_s"])
    shard_table = "\n".join(
        [
            "| pulled from 1 peer | MB | median s | vs whole model (time: min-max) |",
            "|---|---:|---:|---:|",
            f"| whole model | {whole_mb:.1f} | {whole_s:.2f} | 1.00x |",
            f"| shard server's files for blocks {SHARD} | {shard_mb:.1f} | {shard_s:.2f} | "
            f"{ratio_cell(shard_time)} time, {shard_mb / whole_mb:.2f}x bytes |",
        ]
    )
    print(shard_table)
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    if not args.no_doc:
        write_doc_section(
            SECTION,
            f"### Model pull (`benchmarks/pull.py`)\n\n"
            f"{datetime.now(UTC):%Y-%m-%d} on {machine}; SmolLM2-135M-Instruct lossless-4 dir "
            f"(~150 MB, one data file per block), {args.chunk_mib} MiB chunks, "
            f"{args.per_source} streams per source, {args.rounds} interleaved rounds, "
            f"registry/peers/puller in one process on loopback. {RATIO_DEFINITION}\n\n"
            f"{table}\n\n"
            "All peers share the puller's process (one GIL) and py-libp2p runs Noise and yamux "
            "in Python, so here extra peers add no CPU and peer pulls are CPU-bound below HTTP; "
            "on separate machines each peer brings its own CPU and uplink.\n\n"
            f"{shard_table}\n\n"
            "A shard server fetches only what building its shard reads (`shard_files`): the "
            f"graph, the facts and its blocks' data files ({len(shard_files(model_dir(), SHARD))} "
            "files); the first and last thirds also need the embedding table (the last one for "
            "its tied head).\n",
        )
    fields = {
        **ratio_fields("peers3_vs_registry", vs_registry["peers3"]),
        **ratio_fields("peers1_vs_registry", vs_registry["peers1"]),
        "registry_mb_s": f"{median['registry']:.1f}",
        "peers1_mb_s": f"{median['peers1']:.1f}",
        "peers3_mb_s": f"{median['peers3']:.1f}",
        **ratio_fields("shard_vs_whole_time", shard_time),
        "shard_vs_whole_bytes": f"{shard_mb / whole_mb:.2f}",
    }
    print(headline(fields))


if __name__ == "__main__":
    main()
