"""Cold vs warm cost of one pipeline hop's own Python, and of the calls this project
replaced on that path (old and new side by side), all in one run on this machine.

A shard step streams tens of MB of weights through the CPU caches, so the Python that
handles a hop's messages right after it runs with cold caches: instruction and data
misses make each call many times slower than a warm micro-benchmark says. Every measure
here runs N times right after sweeping 64 MB (cold) and N times back to back (warm), in R
paired rounds; ratios are medians of the per-round ratios, with their min-max. In a real
hop the sweep is the step itself.

1. The hop path stage by stage, with the real code: the client encodes and seals a decode
   step (hidden states, 576 floats, as SmolLM2's boundaries carry), the server unseals,
   unpacks, decodes and checks it, its machine accepts it and then takes the output, the
   server encodes and seals the reply, and the client unseals and decodes that.
2. Calls replaced on that path, old vs new: ``np.prod`` vs ``math.prod`` (tensor size
   check), ``dtype.name`` vs a dict lookup (tensor encoding), numpy reductions vs Python
   over the top-k ids, ``trio.Lock`` vs :class:`QuickLock` (uncontended), and trio's
   ``SocketStream.send_all`` vs the direct lane's write, over a loopback TCP pair.

``python benchmarks/hop_cold.py [--n N] [--rounds R] [--no-doc]``.
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

from benchmarks._report import (  # noqa: E402
    RATIO_DEFINITION,
    headline,
    machine,
    paired_ratio,
    ratio_cell,
    ratio_fields,
    table,
    turns,
    write_section,
)
from p2pedge.ids import LayerRange  # noqa: E402
from p2pedge.protocols._stream import QuickLock  # noqa: E402
from p2pedge.protocols.direct.handler import SocketByteStream  # noqa: E402
from p2pedge.protocols.direct.tls import pair_in_memory  # noqa: E402
from p2pedge.protocols.pipeline import codec  # noqa: E402
from p2pedge.protocols.pipeline.machine import KvBudget, ServerMachine, ShardSpec  # noqa: E402
from p2pedge.wire.messages import pack, unpack_map  # noqa: E402

HIDDEN = 576
SWEEP = np.ones(16 << 20, dtype=np.float32)  # 64 MB: more than this machine's caches
MAX_FRAME = 1 << 24


def flush() -> None:
    SWEEP.sum()


Samples = dict[str, list[float]]  # name -> one median in µs per round


def paired_timed(fns: dict[str, Callable[[], object]], n: int, rounds: int) -> Samples:
    """Per round, the median µs of each of ``fns`` over ``n`` calls, each right after a
    sweep; the calls take turns, the order rotating per call, so drift hits all alike."""
    for fn in fns.values():
        fn()
    out: Samples = {name: [] for name in fns}
    for _ in range(rounds):
        samples: dict[str, list[int]] = {name: [] for name in fns}
        for i in range(n):
            for name in turns(list(fns), i):
                flush()
                began = time.perf_counter_ns()
                fns[name]()
                samples[name].append(time.perf_counter_ns() - began)
        for name, values in samples.items():
            out[name].append(statistics.median(values) / 1000)
    return out


async def paired_timed_async(
    fns: dict[str, Callable[[], Awaitable[object]]],
    n: int,
    rounds: int,
    after: Callable[[], Awaitable[object]] | None = None,
) -> Samples:
    """:func:`paired_timed` for coroutines; ``after`` runs untimed after each call."""
    out: Samples = {name: [] for name in fns}
    for _ in range(rounds):
        samples: dict[str, list[int]] = {name: [] for name in fns}
        for i in range(n):
            for name in turns(list(fns), i):
                flush()
                began = time.perf_counter_ns()
                await fns[name]()
                samples[name].append(time.perf_counter_ns() - began)
                if after is not None:
                    await after()
        for name, values in samples.items():
            out[name].append(statistics.median(values) / 1000)
    return out


# --- 1. the hop path --------------------------------------------------------------------


class Hop:
    """One decode step's messages through the real codec, lane channel and machine."""

    def __init__(self) -> None:
        spec = ShardSpec(False, False, HIDDEN, 49152, 1000, max_length=1 << 16)
        self.machine = ServerMachine({("m", LayerRange(10, 20)): spec}, KvBudget(1 << 40))
        (alloc,) = self.machine.receive(codec.Open(1, "m", 10, 20, 1 << 16), 0.0)
        self.session = alloc.session  # type: ignore[union-attr]
        self.machine.ready(self.session, 0.0)
        self.client, self.server = pair_in_memory()
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


def hop_path(n: int, rounds: int) -> dict[str, tuple[list[float], list[float]]]:
    """Stage -> (warm µs, cold µs), one median of ``n`` passes per round each; in each
    round the warm and the cold passes take turns to go first."""
    hop = Hop()
    stages = hop.stages()
    out: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in stages}
    for r in range(rounds):
        for mode in turns(("warm", "cold"), r):
            samples: dict[str, list[int]] = {name: [] for name in stages}
            for _ in range(n):
                for name, fn in stages.items():
                    if mode == "cold":
                        flush()
                    began = time.perf_counter_ns()
                    fn()
                    samples[name].append(time.perf_counter_ns() - began)
            for name, values in samples.items():
                out[name][mode == "cold"].append(statistics.median(values) / 1000)
    return out


# --- 2. old vs new calls ----------------------------------------------------------------

Replaced = tuple[str, str, list[float], str, list[float]]  # what, old, µs, new, µs per round


def replaced_calls(n: int, rounds: int) -> list[Replaced]:
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
        got = paired_timed({"old": old, "new": new}, n, rounds)
        rows.append((what, old_name, got["old"], new_name, got["new"]))
    return rows


async def replaced_async(n: int, rounds: int) -> list[Replaced]:
    lock, quick = trio.Lock(), QuickLock()

    async def trio_lock() -> None:
        async with lock:
            pass

    async def quick_lock() -> None:
        async with quick:
            pass

    locks = await paired_timed_async({"old": trio_lock, "new": quick_lock}, n, rounds)
    rows = [("uncontended lock", "trio.Lock", locks["old"], "QuickLock", locks["new"])]
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

    # the reader drains outside the timed part
    sends = await paired_timed_async({"old": trio_send, "new": lane_write}, n, rounds, drain)
    rows.append(
        (
            "send a 2.4 KB frame (loopback TCP)",
            "trio SocketStream.send_all",
            sends["old"],
            "lane write (os.write when ready)",
            sends["new"],
        )
    )
    await sender.aclose()
    await receiver.aclose()
    await listeners[0].aclose()
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=60, help="samples per measure and round")
    ap.add_argument("--rounds", type=int, default=5, help="paired rounds")
    ap.add_argument("--no-doc", action="store_true")
    args = ap.parse_args(argv)
    began = time.perf_counter()
    path = hop_path(args.n, args.rounds)
    calls = replaced_calls(args.n, args.rounds) + trio.run(replaced_async, args.n, args.rounds)
    med = statistics.median
    warm_totals = [sum(rounds) for rounds in zip(*(w for w, _ in path.values()), strict=True)]
    cold_totals = [sum(rounds) for rounds in zip(*(c for _, c in path.values()), strict=True)]
    total = paired_ratio(cold_totals, warm_totals)
    hop_rows = [
        (name, f"{med(w):.1f}", f"{med(c):.1f}", ratio_cell(paired_ratio(c, w), 1))
        for name, (w, c) in path.items()
    ]
    hop_rows.append(
        ("**total**", f"{med(warm_totals):.1f}", f"{med(cold_totals):.1f}", ratio_cell(total, 1))
    )
    call_rows = [
        (
            what,
            old_name,
            f"{med(old):.1f}",
            new_name,
            f"{med(new):.1f}",
            ratio_cell(paired_ratio(old, new), 1),
        )
        for what, old_name, old, new_name, new in calls
    ]
    body = "\n\n".join(
        [
            "## A hop's own Python, cold vs warm (benchmarks/hop_cold.py)",
            f"Measured {machine()}; {args.rounds} paired rounds of {args.n} samples per "
            f"measure; times are medians of the rounds' medians. {RATIO_DEFINITION}",
            table(
                ("stage", "warm µs", "cold µs (after a 64 MB sweep)", "cold / warm (min-max)"),
                hop_rows,
            ),
            table(
                (
                    "on the hop path",
                    "before",
                    "cold µs",
                    "now",
                    "cold µs",
                    "before / now (min-max)",
                ),
                call_rows,
            ),
            "- Cold: each call right after sweeping 64 MB, as after a shard step; warm: "
            "back to back. The stages are the real codec, lane channel and server machine "
            "for one decode step of 576 floats; socket waits, trio's scheduler and "
            "onnxruntime are not in them (see the sharded section for whole hops).\n"
            "- The second table's left column is what the hop path called before this "
            "change, measured in the same rounds (old and new calls taking turns).\n"
            f"- (took {time.perf_counter() - began:.0f} s)",
        ]
    )
    print(body)
    if not args.no_doc:
        write_section("hop_cold", body)
    fields = {
        "hop_python_cold_us": f"{med(cold_totals):.0f}",
        "hop_python_warm_us": f"{med(warm_totals):.0f}",
        **ratio_fields("cold_vs_warm", total, 1),
    }
    print(headline(fields))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
