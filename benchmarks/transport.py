"""Round trip of hidden-state-sized frames between two node processes: py-libp2p stream
vs direct lane (TLS 1.3) vs the lane's former home-made sealing, in the same run.

A server process (a real :class:`~p2pedge.node.node.Node`) echoes frames on a test protocol
over its libp2p stream handler and its direct lane, and over a TCP listener that frames
exactly as the lane did before TLS (ChaCha20-Poly1305 per frame with a counter nonce,
:class:`ChaChaChannel`, kept here only as the baseline; its key comes with the server's
address, so no handshake is timed for it). The client node sends one frame, waits for the
echo, and repeats. 2304 bytes is one SmolLM2 token's fp32 hidden state (what a pipeline hop
carries while decoding); ``--step-size`` (587520: 255 tokens) is a prompt step's. Client
CPU per round trip is measured too: on a small machine it competes with the shards'
compute. The paths take turns round by round; each ratio is the median of the per-round
ratios of round-trip medians, with its min-max.

A second table measures the same echo when the server first works for ``--work-ms``
(13 ms: a third of SmolLM2's decode step here), as a shard server does: what a reply
costs beyond the work once both sides have sat idle. Three paths: plain blocking TCP in a
thread (no trio, no libp2p: the machine's floor), the lane with the work on the trio
thread, and the lane with the work in ``trio.to_thread`` (as the pipeline server runs
onnxruntime). On a VM an idle vCPU halts, and waking it again is slow.

``python benchmarks/transport.py [--trips N] [--rounds R] [--size BYTES] [--step-size BYTES]
[--step-trips N] [--work-ms MS] [--no-doc]``
"""

from __future__ import annotations

import argparse
import hashlib
import json
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import trio
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

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
from p2pedge.errors import PeerUnavailable, RemoteProtocolError  # noqa: E402
from p2pedge.node.config import NodeConfig, Tuning  # noqa: E402
from p2pedge.node.node import Node  # noqa: E402
from p2pedge.protocols._stream import FramedStream  # noqa: E402
from p2pedge.protocols.direct.handler import SocketByteStream  # noqa: E402
from p2pedge.wire.framing import PREFIX, FrameDecoder  # noqa: E402

PROTO = "/p2pedge/bench-echo/1.0.0"
WARMUP = 50
# first payload byte: how the server treats the frame before echoing it
ECHO, WORK_INLINE, WORK_THREAD = 0, 1, 2
WORK_CHUNK = bytes(1 << 16)  # hashing it releases the GIL, like onnxruntime's compute


def work(seconds: float) -> None:
    """Keep one core busy for ``seconds`` without holding the GIL for long."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        hashlib.sha256(WORK_CHUNK)


def serve_plain(listener: socket.socket, work_s: float) -> None:
    """Blocking TCP echo with the same framing (4-byte length), one client at a time."""
    while True:
        conn, _ = listener.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with conn:
            while header := _read_exact(conn, 4):
                data = _read_exact(conn, int.from_bytes(header, "big"))
                if data[:1] != bytes([ECHO]):
                    work(work_s)
                conn.sendall(header + data)


def _read_exact(conn: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = conn.recv(n - len(buf))
        if not chunk:
            return b""
        buf += chunk
    return bytes(buf)


class ChaChaChannel:
    """The lane's framing before TLS (baseline only): ``length || ChaCha20-Poly1305(key,
    nonce = direction || counter, payload, ad = length)``."""

    def __init__(self, key: bytes, *, client: bool, max_frame: int = 1 << 24) -> None:
        self._aead = ChaCha20Poly1305(key)
        self._send, self._recv = (0, 1) if client else (1, 0)
        self._sent = self._received = 0
        self.max_frame = max_frame
        self._frames = FrameDecoder(max_frame + 16, min_frame=16)

    def seal(self, payload: bytes) -> bytes:
        prefix = PREFIX.pack(len(payload) + 16)
        nonce = self._send.to_bytes(4, "big") + self._sent.to_bytes(8, "big")
        self._sent += 1
        return prefix + self._aead.encrypt(nonce, payload, prefix)

    def feed(self, data: bytes) -> list[bytes]:
        frames = []
        for body in self._frames.feed(data):
            nonce = self._recv.to_bytes(4, "big") + self._received.to_bytes(8, "big")
            frames.append(self._aead.decrypt(nonce, body, PREFIX.pack(len(body))))
            self._received += 1
        return frames


class ChaChaStream(FramedStream):
    """A lane stream as it was: the same socket I/O, the former sealing."""

    def __init__(self, tcp: trio.SocketStream, key: bytes, *, client: bool) -> None:
        super().__init__(SocketByteStream(tcp))
        self.channel = ChaChaChannel(key, client=client)

    def _encode(self, payload: bytes) -> bytes:
        return self.channel.seal(payload)

    def _decode(self, chunk: bytes) -> list[bytes]:
        return self.channel.feed(chunk)


def node_config() -> NodeConfig:
    return NodeConfig(
        data_dir=Path(tempfile.mkdtemp(prefix="p2pedge-transport-")),
        tuning=Tuning(measure_compute=False, announce_on_start=False, self_lookup=False),
    )


async def serve(work_s: float) -> None:
    async def echo(stream: FramedStream, peer_id: str) -> None:
        while True:
            data = await stream.receive_bytes()
            if data[:1] == bytes([WORK_INLINE]):
                work(work_s)
            elif data[:1] == bytes([WORK_THREAD]):
                await trio.to_thread.run_sync(work, work_s)
            await stream.send_bytes(data)

    async def chacha(tcp: trio.SocketStream) -> None:
        try:
            await echo(ChaChaStream(tcp, key, client=False), "")
        except (PeerUnavailable, RemoteProtocolError):
            return

    listener = socket.create_server(("127.0.0.1", 0))
    threading.Thread(target=serve_plain, args=(listener, work_s), daemon=True).start()
    key = secrets.token_bytes(32)
    chacha_listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    async with Node(node_config()) as node:
        node.set_stream_handler(PROTO, echo)
        await node.lanes.serve(PROTO, echo)
        node.nursery.start_soon(trio.serve_listeners, chacha, chacha_listeners)
        info = {
            "peer": node.peer_id,
            "addr": node.addrs[0],
            "plain": listener.getsockname()[1],
            "chacha": chacha_listeners[0].socket.getsockname()[1],
            "key": key.hex(),
        }
        print(json.dumps(info), flush=True)
        await trio.sleep_forever()


async def trips(
    stream: FramedStream, payload: bytes, n: int, warmup: int = WARMUP
) -> tuple[list[float], float]:
    """Round-trip seconds of ``n`` echoes and the client's CPU seconds per trip."""
    for _ in range(warmup):
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


def plain_trips(port: int, payload: bytes, n: int) -> list[float]:
    """Round-trip seconds of ``n`` echoes over blocking TCP (the floor without trio)."""
    with socket.create_connection(("127.0.0.1", port)) as conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        frame = len(payload).to_bytes(4, "big") + payload
        times: list[float] = []
        for _ in range(n):
            began = time.perf_counter()
            conn.sendall(frame)
            _read_exact(conn, len(frame))
            times.append(time.perf_counter() - began)
    return times


async def measure_paused(
    info: dict[str, Any], size: int, n: int, rounds: int, work_s: float
) -> dict[str, list[float]]:
    """Seconds beyond ``work_s`` per round trip when the server works before replying."""
    results: dict[str, list[float]] = {name: [] for name in PAUSED}
    async with Node(node_config()) as node:
        peer = await node.connect(info["addr"])
        lane = await node.lanes.open(peer, PROTO, timeout=10)
        for r in range(rounds):
            for name in turns(list(PAUSED), r):
                mode = PAUSED[name]
                payload = bytes([mode]) + bytes(size - 1)
                if name == "plain TCP, work inline":
                    times = await trio.to_thread.run_sync(plain_trips, info["plain"], payload, n)
                else:
                    times = (await trips(lane, payload, n, warmup=2))[0]
                results[name] += [t - work_s for t in times]
        await lane.close()
    return results


PAUSED = {
    "plain TCP, work inline": WORK_INLINE,
    "lane, work on the trio thread": WORK_INLINE,
    "lane, work in trio.to_thread": WORK_THREAD,
}


PATHS = ("libp2p", "lane: ChaCha20-Poly1305 (before)", "lane: TLS 1.3")


async def measure(
    info: dict[str, Any], sizes: dict[int, int], rounds: int
) -> dict[int, dict[str, list[float]]]:
    """Per frame size (-> trips per round and path): every trip's seconds per path, and
    per round each path's p50 (``p50 PATH``) and client CPU per trip (``cpu PATH``)."""
    results: dict[int, dict[str, list[float]]] = {
        size: {key: [] for path in PATHS for key in (path, f"p50 {path}", f"cpu {path}")}
        for size in sizes
    }
    async with Node(node_config()) as node:
        peer = await node.connect(info["addr"])
        plain = await node.open_stream(peer, PROTO)
        lane = await node.lanes.open(peer, PROTO, timeout=10)
        if type(lane) is FramedStream:
            raise RuntimeError("the server offered no direct lane")
        tcp = await trio.open_tcp_stream("127.0.0.1", info["chacha"])
        tcp.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        before = ChaChaStream(tcp, bytes.fromhex(info["key"]), client=True)
        streams = dict(zip(PATHS, (plain, before, lane), strict=True))
        for r in range(rounds):  # interleaved so machine noise hits all alike
            for size, n in sizes.items():
                payload = bytes(size)
                for name in turns(list(streams), r):
                    times, cpu = await trips(streams[name], payload, n, warmup=min(WARMUP, n))
                    results[size][name] += times
                    results[size][f"cpu {name}"].append(cpu)
                    results[size][f"p50 {name}"].append(statistics.median(times))
        for stream in streams.values():
            await stream.close()
    return results


def main(argv: list[str] | None = None) -> int:
    args_in = argv if argv is not None else sys.argv[1:]
    if args_in[:1] == ["--serve"]:  # the echo process: --serve WORK_SECONDS
        trio.run(serve, float(args_in[1]))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trips", type=int, default=500, help="round trips per round and path")
    ap.add_argument("--rounds", type=int, default=5, help="paired rounds")
    ap.add_argument("--size", type=int, default=2304, help="frame payload bytes")
    ap.add_argument("--step-size", type=int, default=255 * 2304, help="prompt step frame bytes")
    ap.add_argument("--step-trips", type=int, default=40, help="step round trips per round")
    ap.add_argument("--work-ms", type=float, default=13.0, help="server work per paused trip")
    ap.add_argument("--paused-trips", type=int, default=60, help="paused trips per round and path")
    ap.add_argument("--no-doc", action="store_true")
    args = ap.parse_args(args_in)
    work_s = args.work_ms / 1000
    sizes = {args.size: args.trips, args.step_size: args.step_trips}
    server = subprocess.Popen(
        [sys.executable, __file__, "--serve", str(work_s)], stdout=subprocess.PIPE, cwd=str(ROOT)
    )
    try:
        assert server.stdout is not None
        info = json.loads(server.stdout.readline())
        res = trio.run(measure, info, sizes, args.rounds)
        paused = trio.run(measure_paused, info, args.size, args.paused_trips, args.rounds, work_s)
    finally:
        server.terminate()
        server.wait()
    libp2p, chacha, tls = PATHS
    rows: list[list[str]] = []
    p50: dict[tuple[int, str], float] = {}
    ratios: dict[tuple[int, str], Ratio] = {}
    for size, by in res.items():
        ratios[size, "speedup"] = paired_ratio(by[f"p50 {libp2p}"], by[f"p50 {tls}"])
        ratios[size, "tls"] = paired_ratio(by[f"p50 {tls}"], by[f"p50 {chacha}"])
        for name in PATHS:
            ordered = sorted(by[name])
            p50[size, name] = statistics.median(ordered) * 1e6
            p95 = ordered[int(len(ordered) * 0.95)] * 1e6
            cpu = statistics.median(by[f"cpu {name}"]) * 1e6
            versus = {tls: ratio_cell(ratios[size, "tls"]), chacha: "baseline"}.get(name, "")
            cells = [f"{p50[size, name]:.0f}", f"{p95:.0f}", f"{cpu:.0f}", versus]
            rows.append([f"{size}", name, *cells])
    body = table(
        [
            "frame bytes",
            "path",
            "round trip p50 µs",
            "p95 µs",
            "client CPU per trip µs",
            "TLS / ChaCha round trip (min-max)",
        ],
        rows,
    )
    paused_p50 = {name: statistics.median(v) * 1e6 for name, v in paused.items()}
    paused_rows = [
        [name, f"{paused_p50[name]:.0f}", f"{sorted(v)[int(len(v) * 0.95)] * 1e6:.0f}"]
        for name, v in paused.items()
    ]
    paused_body = table(
        ["path (the work: modeled by hashing)", "beyond the work, p50 µs", "p95 µs"], paused_rows
    )
    body += (
        f"\n\nAfter a pause: the server works {args.work_ms:g} ms before each echo "
        f"({args.paused_trips} trips per round and path, interleaved; the lane is TLS):"
        f"\n\n{paused_body}"
    )
    print(body)
    small, step = args.size, args.step_size
    if not args.no_doc:
        write_section(
            "transport",
            "## Transport: libp2p stream vs direct lane (`benchmarks/transport.py`)\n\n"
            f"{machine()}. Two node processes on 127.0.0.1; {small}-byte frames (one "
            f"SmolLM2 token's fp32 hidden state) echoed {args.trips} times per round and "
            f"{step}-byte frames (a 255-token prompt step) {args.step_trips} times, "
            f"{args.rounds} interleaved rounds. {RATIO_DEFINITION} The libp2p path is "
            "py-libp2p 0.8.1 (TCP, Noise, yamux); the lane is TLS 1.3 (the standard "
            "library's ssl, OpenSSL) on TCP, set up over libp2p; the ChaCha rows are the "
            "lane's former home-made sealing on the same socket code (no handshake timed).\n\n"
            f"{body}\n\nRound trip p50 speed-up of the lane over libp2p, {small} bytes: "
            f"{ratio_cell(ratios[small, 'speedup'], 1)}. "
            "The paused rows are what one pipeline hop pays beyond its compute on this "
            "machine, before any pipeline code runs.",
        )
    floor = paused_p50["plain TCP, work inline"]
    threaded = paused_p50["lane, work in trio.to_thread"]
    fields = {
        "lane_rtt_us": f"{p50[small, tls]:.0f}",
        "chacha_rtt_us": f"{p50[small, chacha]:.0f}",
        "libp2p_rtt_us": f"{p50[small, libp2p]:.0f}",
    }
    fields |= ratio_fields("lane_speedup", ratios[small, "speedup"])
    fields |= ratio_fields("tls_vs_chacha", ratios[small, "tls"])
    fields |= ratio_fields("tls_vs_chacha_step", ratios[step, "tls"])
    fields |= {"paused_plain_us": f"{floor:.0f}", "paused_lane_thread_us": f"{threaded:.0f}"}
    print(headline(fields))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
