"""QUIC vs TCP between two node processes: small-frame round trip, bulk throughput of
blob-sized replies, and connection setup, in the same run.

A server process (a real :class:`~p2pedge.node.node.Node` listening on TCP and QUIC, with
the bounds of :mod:`p2pedge.reach.quic`) serves a test protocol: a frame starting with 0
is echoed, a frame starting with 1 is answered with ``--bulk-bytes`` (4 MiB: the largest
blob chunk). The client process holds two nodes, one listening on TCP only and one on
QUIC only, each connected to the server over its own transport (py-libp2p 0.8.1: Noise +
yamux on TCP; TLS 1.3 + QUIC streams in aioquic, pure Python except its crypto). Per round
and transport: the p50 round trip of ``--size``-byte echoes (one SmolLM2 token's fp32
hidden state), the throughput of ``--bulk`` request/reply pulls, and the p50 time to a
first echo from a fresh node (dial, handshake, protocol negotiation, one trip). The
transports take turns round by round; each ratio is QUIC over TCP per round, then the
median with its min-max.

``python benchmarks/quic.py [--trips N] [--bulk N] [--bulk-bytes B] [--setups N]
[--rounds R] [--size BYTES] [--no-doc]``
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks._report import (  # noqa: E402
    RATIO_DEFINITION,
    Ratio,
    headline,
    machine,
    paired_ratio,
    ratio_cell,
    ratio_fields,
    table,
    turns,
    write_section,
)
from p2pedge.node.config import NodeConfig, Tuning  # noqa: E402
from p2pedge.node.node import Node  # noqa: E402
from p2pedge.protocols._stream import FramedStream  # noqa: E402
from p2pedge.reach.quic import is_quic  # noqa: E402

PROTO = "/p2pedge/bench-quic/1.0.0"
ECHO, BULK = 0, 1
TCP_LISTEN = "/ip4/127.0.0.1/tcp/0"
QUIC_LISTEN = "/ip4/127.0.0.1/udp/0/quic-v1"
TRANSPORTS = ("TCP", "QUIC")


def node_config(*listen: str) -> NodeConfig:
    return NodeConfig(
        data_dir=Path(tempfile.mkdtemp(prefix="p2pedge-quic-")),
        listen=listen,
        tuning=Tuning(measure_compute=False, announce_on_start=False, self_lookup=False),
    )


async def serve(bulk_bytes: int) -> None:
    reply = bytes(bulk_bytes)

    async def handler(stream: FramedStream, peer_id: str) -> None:
        while True:
            data = await stream.receive_bytes()
            await stream.send_bytes(reply if data[:1] == bytes([BULK]) else data)

    async with Node(node_config(TCP_LISTEN, QUIC_LISTEN)) as node:
        node.set_stream_handler(PROTO, handler)
        quic = next(a for a in node.addrs if is_quic(a))
        tcp = next(a for a in node.addrs if "/tcp/" in a)
        print(json.dumps({"TCP": tcp, "QUIC": quic}), flush=True)
        await trio.sleep_forever()


async def echo_trips(stream: FramedStream, payload: bytes, n: int) -> list[float]:
    times = []
    for _ in range(n):
        began = time.perf_counter()
        await stream.send_bytes(payload)
        await stream.receive_bytes()
        times.append(time.perf_counter() - began)
    return times


async def bulk_rate(stream: FramedStream, n: int) -> float:
    """MiB/s of ``n`` request/reply pulls (the reply is the server's bulk frame)."""
    received, began = 0, time.perf_counter()
    for _ in range(n):
        await stream.send_bytes(bytes([BULK]))
        received += len(await stream.receive_bytes())
    return received / (time.perf_counter() - began) / 2**20


async def setup_times(listen: str, addr: str, payload: bytes, n: int) -> list[float]:
    """Seconds from dial to the first echo on the first connection of a fresh node (its
    start is not timed), ``n`` times."""
    times = []
    for _ in range(n):
        async with Node(node_config(listen)) as node:
            began = time.perf_counter()
            peer = await node.connect(addr)
            stream = await node.open_stream(peer, PROTO)
            await echo_trips(stream, payload, 1)
            times.append(time.perf_counter() - began)
            await stream.close()
    return times


async def measure(addrs: dict[str, str], args: argparse.Namespace) -> dict[str, Any]:
    """Per transport: every echo's seconds, and per round p50 echo, MiB/s, p50 setup."""
    keys = ("echo", "p50", "mibs", "setup")
    out: dict[str, Any] = {t: {k: [] for k in keys} for t in TRANSPORTS}
    payload = bytes([ECHO]) + bytes(args.size - 1)
    async with Node(node_config(TCP_LISTEN)) as tcp, Node(node_config(QUIC_LISTEN)) as quic:
        nodes = {"TCP": tcp, "QUIC": quic}
        streams = {}
        for name, node in nodes.items():
            peer = await node.connect(addrs[name])
            streams[name] = await node.open_stream(peer, PROTO)
            await echo_trips(streams[name], payload, 20)  # warm up
            await bulk_rate(streams[name], 1)
        for r in range(args.rounds):
            for name in turns(list(TRANSPORTS), r):
                times = await echo_trips(streams[name], payload, args.trips)
                out[name]["echo"] += times
                out[name]["p50"].append(statistics.median(times))
                out[name]["mibs"].append(await bulk_rate(streams[name], args.bulk))
            for name in turns(list(TRANSPORTS), r):
                listen = TCP_LISTEN if name == "TCP" else QUIC_LISTEN
                setups = await setup_times(listen, addrs[name], payload, args.setups)
                out[name]["setup"].append(statistics.median(setups))
    return out


def verdict(ratios: dict[str, Ratio]) -> str:
    """Where QUIC helps, by the medians of this run (below 1 is better, except throughput)."""
    wins = [
        what
        for what, better in (
            ("round trip", ratios["rtt"].median < 1),
            ("throughput", ratios["bulk"].median > 1),
            ("setup", ratios["setup"].median < 1),
        )
        if better
    ]
    if not wins:
        return "QUIC is behind TCP on every measure in this run."
    return f"QUIC is ahead of TCP on {', '.join(wins)} in this run: revisit `prefer_tcp`."


def main(argv: list[str] | None = None) -> int:
    args_in = argv if argv is not None else sys.argv[1:]
    if args_in[:1] == ["--serve"]:  # the server process: --serve BULK_BYTES
        trio.run(serve, int(args_in[1]))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trips", type=int, default=300, help="echoes per round and transport")
    ap.add_argument("--bulk", type=int, default=4, help="bulk pulls per round and transport")
    ap.add_argument("--bulk-bytes", type=int, default=4 * 2**20, help="bytes per bulk reply")
    ap.add_argument("--setups", type=int, default=5, help="fresh connections per round")
    ap.add_argument("--rounds", type=int, default=5, help="paired rounds")
    ap.add_argument("--size", type=int, default=2304, help="echo frame bytes")
    ap.add_argument("--no-doc", action="store_true")
    args = ap.parse_args(args_in)
    server = subprocess.Popen(
        [sys.executable, __file__, "--serve", str(args.bulk_bytes)],
        stdout=subprocess.PIPE,
        cwd=str(ROOT),
    )
    try:
        assert server.stdout is not None
        addrs = json.loads(server.stdout.readline())
        res = trio.run(measure, addrs, args)
    finally:
        server.terminate()
        server.wait()
    tcp, quic = res["TCP"], res["QUIC"]
    ratios: dict[str, Ratio] = {
        "rtt": paired_ratio(quic["p50"], tcp["p50"]),
        "bulk": paired_ratio(quic["mibs"], tcp["mibs"]),
        "setup": paired_ratio(quic["setup"], tcp["setup"]),
    }
    rows = []
    for name in TRANSPORTS:
        by = res[name]
        ordered = sorted(by["echo"])
        p95 = ordered[int(len(ordered) * 0.95)] * 1e6
        versus = name == "QUIC"
        rows.append(
            [
                name,
                f"{statistics.median(ordered) * 1e6:.0f}",
                f"{p95:.0f}",
                ratio_cell(ratios["rtt"]) if versus else "baseline",
                f"{statistics.median(by['mibs']):.1f}",
                ratio_cell(ratios["bulk"]) if versus else "baseline",
                f"{statistics.median(by['setup']) * 1e3:.1f}",
                ratio_cell(ratios["setup"]) if versus else "baseline",
            ]
        )
    body = table(
        [
            "transport",
            f"{args.size} B round trip p50 µs",
            "p95 µs",
            "QUIC / TCP round trip",
            f"{args.bulk_bytes >> 20} MiB pulls MiB/s",
            "QUIC / TCP throughput",
            "fresh node: dial to first echo ms",
            "QUIC / TCP setup",
        ],
        rows,
    )
    print(body)
    if not args.no_doc:
        write_section(
            "quic",
            "## QUIC vs TCP (`benchmarks/quic.py`)\n\n"
            f"{machine()}. Two node processes on 127.0.0.1, one connection per transport: "
            f"{args.size}-byte echoes ({args.trips} per round), {args.bulk} request/reply "
            f"pulls of {args.bulk_bytes} bytes per round, and {args.setups} fresh client "
            "nodes per round, each timed from dial to first echo (handshake, stream "
            "negotiation, one trip), "
            f"{args.rounds} interleaved rounds. TCP is py-libp2p 0.8.1's Noise + yamux; "
            "QUIC is its aioquic transport (1200-byte datagrams) with p2pedge's bounds "
            "(credit from application reads). "
            f"{RATIO_DEFINITION}\n\n{body}\n\n{verdict(ratios)} A node that listens on "
            "both dials a peer's TCP address first (`p2pedge.reach.quic.prefer_tcp`); see "
            "[Behind NAT](nat.md#quic).",
        )
    fields = {
        "tcp_rtt_us": f"{statistics.median(tcp['echo']) * 1e6:.0f}",
        "quic_rtt_us": f"{statistics.median(quic['echo']) * 1e6:.0f}",
        "tcp_mibs": f"{statistics.median(tcp['mibs']):.1f}",
        "quic_mibs": f"{statistics.median(quic['mibs']):.1f}",
    }
    fields |= ratio_fields("quic_vs_tcp_rtt", ratios["rtt"])
    fields |= ratio_fields("quic_vs_tcp_throughput", ratios["bulk"])
    fields |= ratio_fields("quic_vs_tcp_setup", ratios["setup"])
    print(headline(fields))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
