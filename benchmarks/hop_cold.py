"""Cold vs warm cost of one pipeline hop's own Python, and of the calls this project
replaced on that path (old and new side by side), all in one run on this machine.

A shard step streams tens of MB of weights through the CPU caches, so the Python that
handles a hop's messages right after it runs with cold caches: instruction and data
misses make each call many times slower than a warm micro-benchmark says. Every measure
here runs N times right after sweeping 64 MB (cold) and N times back to back (warm);
medians. In a real hop the sweep is the step itself.

1. The hop path stage by stage, with the real code: the client encodes and seals a decode
   step (hidden states, 576 floats, as SmolLM2's boundaries carry), the server unseals,
   unpacks, decodes and checks it, its machine accepts it and then takes the output, the
   server encodes and seals the reply, and the client unseals and decodes that.
2. Calls replaced on that path, old vs new: ``np.prod`` vs ``math.prod`` (tensor size
   check), ``dtype.name`` vs a dict lookup (tensor encoding), numpy reductions vs Python
   over the top-k ids, ``trio.Lock`` vs :class:`QuickLock` (uncontended), and trio's
   ``SocketStream.send_all`` vs the direct lane's write, over a loopback TCP pair.

``python benchmarks/hop_cold.py [--n N] [--no-doc]``.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import numpy as np
import trio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks._report import machine, table, write_section  # noqa: E402
from p2pedge.ids import LayerRange  # noqa: E402
from p2pedge.protocols._stream import QuickLock  # noqa: E402
from p2pedge.protocols.direct.codec import SealedChannel  # noqa: E402
from p2pedge.protocols.direct.handler import SocketByteStream  # noqa: E402
from p2pedge.protocols.pipeline import codec  # noqa: E402
from p2pedge.protocols.pipeline.machine import KvBudget, ServerMachine, ShardSpec  # noqa: E402
from p2pedge.wire.messages import pack, unpack_map  # noqa: E402

HIDDEN = 576
SWEEP = np.ones(16 << 20, dtype=np.float32)  # 64 MB: more than this machine's caches
MAX_FRAME = 1 << 24


def flush() -> None:
    SWEEP.sum()


def timed(fn: Callable[[], object], n: int, cold: bool) -> float:
    """Median microseconds of ``fn``, each call after a sweep when ``cold``."""
    fn()
    samples = []
    for _ in range(n):
        if cold:
            flush()
        began = time.perf_counter_ns()
        fn()
        samples.append(time.perf_counter_ns() - began)
    return statistics.median(samples) / 1000


async def timed_async(fn: Callable[[], Awaitable[object]], n: int, cold: bool) -> float:
    await fn()
    samples = []
    for _ in range(n):
        if cold:
            flush()
        began = time.perf_counter_ns()
        await fn()
        samples.append(time.perf_counter_ns() - began)
    return statistics.median(samples) / 1000


# --- 1. the hop path --------------------------------------------------------------------


class Hop:
    """One decode step's messages through the real codec, lane channel and machine."""

    def __init__(self) -> None:
        spec = ShardSpec(False, False, HIDDEN, 49152, 1000, max_length=1 << 16)
        self.machine = ServerMachine({("m", LayerRange(10, 20)): spec}, KvBudget(1 << 40))
        (alloc,) = self.machine.receive(codec.Open(1, "m", 10, 20, 1 << 16), 0.0)
        self.session = alloc.session  # type: ignore[union-attr]
        self.machine.ready(self.session, 0.0)
        key = bytes(32)
        self.client = SealedChannel(key, client=True)
        self.server = SealedChannel(key, client=False)
        self.x = np.random.default_rng(0).standard_normal((1, 1, HIDDEN)).astype(np.float32)
        self.position = 0

    def stages(self) -> dict[str, Callable[[], object]]:
        """Each stage consumes what the one before produced, so they run in order."""
        box: dict[str, object] = {}

        def client_encode() -> None:
            step = codec.Step(self.position + 1, self.session, self.position, self.x)
            box["wire"] = self.client.seal(pack(codec.to_map(step)))

        def server_unseal() -> None:
            box["frame"] = self.server.feed(box["wire"])[0]  # type: ignore[arg-type]

        def server_decode() -> None:
            box["msg"] = codec.from_map(unpack_map(box["frame"], MAX_FRAME))  # type: ignore[arg-type]

        def server_machine() -> None:
            box["run"] = self.machine.receive(box["msg"], 1.0)[0]  # type: ignore[arg-type]

        def server_done() -> None:
            box["reply"] = self.machine.step_done(self.session, self.x, 1.0)[0].reply  # type: ignore[union-attr]
            self.position += 1

        def server_encode() -> None:
            box["back"] = self.server.seal(pack(codec.to_map(box["reply"])))  # type: ignore[arg-type]

        def client_decode() -> None:
            frame = self.client.feed(box["back"])[0]  # type: ignore[arg-type]
            box["out"] = codec.from_map(unpack_map(frame, MAX_FRAME))

        return {
            "client: encode + seal the step": client_encode,
            "server: unseal": server_unseal,
            "server: unpack + decode + check fields": server_decode,
            "server: machine accepts the step": server_machine,
            "server: machine takes the output": server_done,
            "server: encode + seal the reply": server_encode,
            "client: unseal + unpack + decode": client_decode,
        }


def hop_path(n: int) -> dict[str, tuple[float, float]]:
    """Stage -> (warm us, cold us); each round runs all stages in order."""
    hop = Hop()
    stages = hop.stages()
    warm: dict[str, list[int]] = {name: [] for name in stages}
    cold: dict[str, list[int]] = {name: [] for name in stages}
    for samples, sweep in ((warm, False), (cold, True)):
        for _ in range(n):
            for name, fn in stages.items():
                if sweep:
                    flush()
                began = time.perf_counter_ns()
                fn()
                samples[name].append(time.perf_counter_ns() - began)
    return {
        name: (statistics.median(warm[name]) / 1000, statistics.median(cold[name]) / 1000)
        for name in stages
    }


# --- 2. old vs new calls ----------------------------------------------------------------


def replaced_calls(n: int) -> list[tuple[str, str, float, str, float]]:
    shape = [1, 1, HIDDEN]
    x = np.zeros(shape, dtype=np.float32)
    names = {np.dtype("<f4"): "float32"}
    ids = np.arange(40, dtype=np.int64)[None]
    rows = []
    pairs: list[tuple[str, str, Callable[[], object], str, Callable[[], object]]] = [
        (
            "tensor size",
            "int(np.prod(shape, dtype=int64))",
            lambda: int(np.prod(shape, dtype=np.int64)),
            "math.prod(shape)",
            lambda: math.prod(shape),
        ),
        (
            "wire dtype name",
            "array.dtype.name",
            lambda: x.dtype.name,
            "dict[array.dtype]",
            lambda: names[x.dtype],
        ),
        (
            "top-k ids in range, distinct",
            "ids.min(), ids.max(), np.unique",
            lambda: (int(ids.min()), int(ids.max()), np.unique(ids).size),
            "Python over ids.tolist()",
            lambda: (lambda v: (min(v), max(v), len(set(v))))(ids.ravel().tolist()),
        ),
    ]
    for what, old_name, old, new_name, new in pairs:
        rows.append((what, old_name, timed(old, n, True), new_name, timed(new, n, True)))
    return rows


async def replaced_async(n: int) -> list[tuple[str, str, float, str, float]]:
    lock, quick = trio.Lock(), QuickLock()

    async def trio_lock() -> None:
        async with lock:
            pass

    async def quick_lock() -> None:
        async with quick:
            pass

    rows = [
        (
            "uncontended lock",
            "trio.Lock",
            await timed_async(trio_lock, n, True),
            "QuickLock",
            await timed_async(quick_lock, n, True),
        )
    ]
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    sender = await trio.open_tcp_stream("127.0.0.1", port)
    receiver = await listeners[0].accept()
    lean = SocketByteStream(sender)
    frame = bytes(2400)

    async def drain() -> None:
        got = 0
        while got < len(frame):
            got += len(await receiver.receive_some(1 << 16))

    async def trio_send() -> None:
        await sender.send_all(frame)

    async def lane_write() -> None:
        await lean.write(frame)

    samples: dict[str, list[int]] = {"trio": [], "lane": []}
    for _ in range(n):  # interleaved; the reader drains outside the timed part
        for name, fn in (("trio", trio_send), ("lane", lane_write)):
            flush()
            began = time.perf_counter_ns()
            await fn()
            samples[name].append(time.perf_counter_ns() - began)
            await drain()
    rows.append(
        (
            "send a 2.4 KB frame (loopback TCP)",
            "trio SocketStream.send_all",
            statistics.median(samples["trio"]) / 1000,
            "lane write (os.write when ready)",
            statistics.median(samples["lane"]) / 1000,
        )
    )
    await sender.aclose()
    await receiver.aclose()
    await listeners[0].aclose()
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=300, help="samples per measure")
    ap.add_argument("--no-doc", action="store_true")
    args = ap.parse_args(argv)
    began = time.perf_counter()
    path = hop_path(args.n)
    calls = replaced_calls(args.n) + trio.run(replaced_async, args.n)
    warm_total = sum(w for w, _ in path.values())
    cold_total = sum(c for _, c in path.values())
    hop_rows = [(name, f"{w:.1f}", f"{c:.1f}", f"{c / w:.1f}x") for name, (w, c) in path.items()]
    hop_rows.append(
        ("**total**", f"{warm_total:.1f}", f"{cold_total:.1f}", f"{cold_total / warm_total:.1f}x")
    )
    call_rows = [
        (what, old_name, f"{old:.1f}", new_name, f"{new:.1f}", f"{old / new:.1f}x")
        for what, old_name, old, new_name, new in calls
    ]
    body = "\n\n".join(
        [
            "## A hop's own Python, cold vs warm (benchmarks/hop_cold.py)",
            f"Measured {machine()}; {args.n} samples per measure, medians.",
            table(("stage", "warm us", "cold us", "cold / warm"), hop_rows),
            table(
                ("on the hop path", "before", "cold us", "now", "cold us", "before / now"),
                call_rows,
            ),
            "- Cold: each call right after sweeping 64 MB, as after a shard step; warm: "
            "back to back. The stages are the real codec, lane channel and server machine "
            "for one decode step of 576 floats; socket waits, trio's scheduler and "
            "onnxruntime are not in them (see the sharded section for whole hops).\n"
            "- The second table's left column is what the hop path called before this "
            "change, measured in the same run.\n"
            f"- (took {time.perf_counter() - began:.0f} s)",
        ]
    )
    print(body)
    if not args.no_doc:
        write_section("hop_cold", body)
    print(
        f"hop_python_cold_us={cold_total:.0f} hop_python_warm_us={warm_total:.0f} "
        f"cold_vs_warm={cold_total / warm_total:.1f}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
