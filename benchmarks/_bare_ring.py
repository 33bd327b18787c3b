"""A floor for any pipeline protocol on this machine: the three shard graphs in three
processes, decoding greedily round a ring, with nothing between them but raw bytes over
blocking loopback TCP (no trio, msgpack, sealing, validation or session machine).

What it costs beyond the one-process local run is the cost of being three processes that
sleep between their steps and wake for the next one; what the real sharded path costs
beyond it is the protocol's. Not a library feature: a baseline for the sharded benchmark.

Run as ``python -m benchmarks._bare_ring SHARD_DIR`` (one per third) by :class:`BareRing`.
Each prints its listening port(s), then reads from stdin the port of the next process
(and, for the last, the client's).
"""

from __future__ import annotations

import select
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from p2pedge.runtime.config import RuntimeConfig  # noqa: E402
from p2pedge.runtime.shard_session import ShardModel, ShardSession  # noqa: E402

HEADER = struct.Struct("<iiii")  # kind, start, positions, tokens left
TOKEN = struct.Struct("<iq")  # position after the step, token picked
RESET, STEP = 0, 1
MAX_LENGTH = 1024
LOOPBACK = "127.0.0.1"


def _read(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError("bare ring peer closed")
        buf += chunk
    return bytes(buf)


def _listener() -> socket.socket:
    sock = socket.socket()
    sock.bind((LOOPBACK, 0))
    sock.listen(2)
    return sock


def _dial(port: int) -> socket.socket:
    sock = socket.create_connection((LOOPBACK, port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _accept(listener: socket.socket) -> socket.socket:
    sock = listener.accept()[0]
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def serve(shard_dir: Path) -> None:
    """One third of the ring: run each step, send the output on (the last third: the
    greedy token to the first third, while tokens are left, and to the client)."""
    model = ShardModel.from_dir(shard_dir, RuntimeConfig(intra_op_threads=1))
    info = model.info
    main, ring = _listener(), _listener() if info.first else None
    ports = [main.getsockname()[1]] + ([ring.getsockname()[1]] if ring else [])
    print(" ".join(map(str, ports)), flush=True)
    wanted = [int(p) for p in sys.stdin.readline().split()]
    send_on = _dial(wanted[0])
    client = _dial(wanted[1]) if info.last else None
    inputs = [_accept(main)] + ([_accept(ring)] if ring else [])
    session: ShardSession | None = None
    while True:
        ready = inputs if len(inputs) == 1 else select.select(inputs, [], [])[0]
        for sock in ready:
            kind, start, n, left = HEADER.unpack(_read(sock, HEADER.size))
            if kind == RESET:
                session = model.new_session(MAX_LENGTH)
                if not info.last:
                    send_on.sendall(HEADER.pack(RESET, 0, 0, 0))
                continue
            assert session is not None
            x: np.ndarray[Any, Any]
            if info.first:
                x = np.frombuffer(_read(sock, 8 * n), dtype=np.int64).reshape(1, n)
            else:
                raw = _read(sock, 4 * n * info.hidden)
                x = np.frombuffer(raw, dtype=np.float32).reshape(1, n, info.hidden)
            y = session.step(x, start)
            if not info.last:
                send_on.sendall(HEADER.pack(STEP, start, n, left) + y.tobytes())
                continue
            token = int(y.reshape(-1).argmax())
            if left > 1:
                step = HEADER.pack(STEP, start + n, 1, left - 1) + struct.pack("<q", token)
                send_on.sendall(step)
            assert client is not None
            client.sendall(TOKEN.pack(start + n, token))


class BareRing:
    """Three :func:`serve` processes over ``shard_dirs`` (first, middle, last) and the
    client's end; :meth:`decode` is blocking (run it in a thread under trio)."""

    def __init__(self, shard_dirs: Sequence[Path]) -> None:
        self._listener = _listener()
        cmd = [sys.executable, "-m", "benchmarks._bare_ring"]
        self.procs = [
            subprocess.Popen(
                [*cmd, str(d)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=ROOT
            )
            for d in shard_dirs
        ]
        try:
            ports = [self._ports(p) for p in self.procs]
            first_main, ring_port = ports[0]
            self._tell(self.procs[0], ports[1][0])
            self._tell(self.procs[1], ports[2][0])
            self._tell(self.procs[2], ring_port, self._listener.getsockname()[1])
            self._first = _dial(first_main)
            self._tokens = _accept(self._listener)
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _ports(proc: subprocess.Popen[bytes]) -> list[int]:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError("a bare ring process exited before listening")
        return [int(p) for p in line.split()]

    @staticmethod
    def _tell(proc: subprocess.Popen[bytes], *ports: int) -> None:
        assert proc.stdin is not None
        proc.stdin.write((" ".join(map(str, ports)) + "\n").encode())
        proc.stdin.flush()

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def decode(self, prompt: Sequence[int], tokens: int) -> tuple[float, list[int]]:
        """Greedy ``tokens`` after ``prompt`` round the ring: decode tok/s measured like
        ``node.complete`` (tokens after the first over the time from first to last), and
        the tokens."""
        self._first.sendall(HEADER.pack(RESET, 0, 0, 0))
        ids = np.asarray(prompt, dtype=np.int64).tobytes()
        self._first.sendall(HEADER.pack(STEP, 0, len(prompt), tokens) + ids)
        times, out = [], []
        for _ in range(tokens):
            _, token = TOKEN.unpack(_read(self._tokens, TOKEN.size))
            times.append(time.perf_counter())
            out.append(token)
        return (tokens - 1) / (times[-1] - times[0]), out

    def close(self) -> None:
        for sock in (getattr(self, "_first", None), getattr(self, "_tokens", None)):
            if sock is not None:
                sock.close()
        for proc in self.procs:
            proc.kill()
            proc.wait()
        self._listener.close()


if __name__ == "__main__":
    try:
        serve(Path(sys.argv[1]))
    except (EOFError, ConnectionError):
        pass  # the client closed the ring (or a neighbour was stopped first)
