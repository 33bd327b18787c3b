"""Round trip of one hidden-state-sized frame between two node processes: py-libp2p stream
vs direct lane, in the same run.

A server process (a real :class:`~p2pedge.node.node.Node`) echoes frames on a test protocol
over both its libp2p stream handler and its direct lane; the client node sends one frame,
waits for the echo, and repeats. 2304 bytes is one SmolLM2 token's fp32 hidden state (what
a pipeline hop carries while decoding). Client CPU per round trip is measured too: on a
small machine it competes with the shards' compute.

``python benchmarks/transport.py [--trips N] [--size BYTES] [--no-doc]``
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

import trio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks._report import machine, table, write_section  # noqa: E402
from p2pedge.node.config import NodeConfig  # noqa: E402
from p2pedge.node.node import Node  # noqa: E402
from p2pedge.protocols._stream import FramedStream  # noqa: E402

PROTO = "/p2pedge/bench-echo/1.0.0"
WARMUP = 50


def node_config() -> NodeConfig:
    return NodeConfig(
        data_dir=Path(tempfile.mkdtemp(prefix="p2pedge-transport-")),
        measure_compute=False,
        announce_on_start=False,
        self_lookup=False,
    )


async def serve() -> None:
    async def echo(stream: FramedStream, peer_id: str) -> None:
        while True:
            await stream.send_bytes(await stream.receive_bytes())

    async with Node(node_config()) as node:
        node.set_stream_handler(PROTO, echo)
        await node.lanes.serve(PROTO, echo)
        print(json.dumps({"peer": node.peer_id, "addr": node.addrs[0]}), flush=True)
        await trio.sleep_forever()


async def trips(stream: FramedStream, payload: bytes, n: int) -> tuple[list[float], float]:
    """Round-trip seconds of ``n`` echoes and the client's CPU seconds per trip."""
    for _ in range(WARMUP):
        await stream.send_bytes(payload)
        await stream.receive_bytes()
    times: list[float] = []
    cpu = time.process_time()
    for _ in range(n):
        began = time.perf_counter()
        await stream.send_bytes(payload)
        await stream.receive_bytes()
        times.append(time.perf_counter() - began)
    return times, (time.process_time() - cpu) / n


async def measure(addr: str, size: int, n: int, rounds: int) -> dict[str, list[float]]:
    results: dict[str, list[float]] = {"libp2p": [], "lane": [], "cpu_libp2p": [], "cpu_lane": []}
    payload = bytes(size)
    async with Node(node_config()) as node:
        peer = await node.connect(addr)
        plain = await node.open_stream(peer, PROTO)
        lane = await node.lanes.open(peer, PROTO, timeout=10)
        if type(lane) is FramedStream:
            raise RuntimeError("the server offered no direct lane")
        for _ in range(rounds):  # interleaved so machine noise hits both alike
            for name, stream in (("libp2p", plain), ("lane", lane)):
                times, cpu = await trips(stream, payload, n)
                results[name] += times
                results[f"cpu_{name}"].append(cpu)
        await plain.close()
        await lane.close()
    return results


def main(argv: list[str] | None = None) -> int:
    if (argv if argv is not None else sys.argv[1:]) == ["--serve"]:  # the echo process
        trio.run(serve)
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trips", type=int, default=500, help="round trips per round and path")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--size", type=int, default=2304, help="frame payload bytes")
    ap.add_argument("--no-doc", action="store_true")
    args = ap.parse_args(argv)
    server = subprocess.Popen(
        [sys.executable, __file__, "--serve"], stdout=subprocess.PIPE, cwd=str(ROOT)
    )
    try:
        assert server.stdout is not None
        info = json.loads(server.stdout.readline())
        res = trio.run(measure, info["addr"], args.size, args.trips, args.rounds)
    finally:
        server.terminate()
        server.wait()
    rows = []
    p50: dict[str, float] = {}
    for name in ("libp2p", "lane"):
        ordered = sorted(res[name])
        p50[name] = statistics.median(ordered) * 1e6
        p95 = ordered[int(len(ordered) * 0.95)] * 1e6
        cpu = statistics.median(res[f"cpu_{name}"]) * 1e6
        rows.append([name, f"{p50[name]:.0f}", f"{p95:.0f}", f"{cpu:.0f}"])
    body = table(["path", "round trip p50 µs", "p95 µs", "client CPU per trip µs"], rows)
    speedup = p50["libp2p"] / p50["lane"]
    print(body)
    if not args.no_doc:
        write_section(
            "transport",
            "## Transport: libp2p stream vs direct lane (`benchmarks/transport.py`)\n\n"
            f"{machine()}. Two node processes on 127.0.0.1; {args.size}-byte frames (one "
            f"SmolLM2 token's fp32 hidden state) echoed {args.trips} times per round, "
            f"{args.rounds} interleaved rounds. The libp2p path is py-libp2p 0.8.1 (TCP, Noise, "
            "yamux); the lane is sealed TCP (ChaCha20-Poly1305) set up over libp2p.\n\n"
            f"{body}\n\nRound trip p50 speed-up of the lane: {speedup:.1f}x.",
        )
    print(f"lane_rtt_us={p50['lane']:.0f} libp2p_rtt_us={p50['libp2p']:.0f} speedup={speedup:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
