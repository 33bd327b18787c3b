"""A 1B-shape model over three shard-server processes vs llama.cpp's RPC backend over
three ``rpc-server`` processes, on the same GGUF, in the same run on this machine.

The model is synthetic (random Q4_0 weights in TinyLlama-1.1B's shape: 22 blocks, hidden
2048, 32 heads, 4 KV heads, FFN 5632, context 2048; a small SentencePiece-style vocabulary,
so the embedding and head are smaller than TinyLlama's), written once under
``.cache/big`` by ``p2pedge.testing.synthetic_gguf`` and imported with ``python -m
p2pedge.models import-gguf`` (lossless 4-bit: the file's Q4_0 blocks as MatMulNBits).

Ours: three ``python -m p2pedge.node --serve`` processes (blocks 0-8, 8-15, 15-22) with
``--threads T``, plus a fourth holding 8-15 again, the replica that lets a session survive
the kill; the client is an in-process Node. llama.cpp: three ``rpc-server -t T`` and
``llama-bench --rpc`` (``-ngl 99``: every layer on an RPC server) with ``-t T``.

Each round, taking turns to go first: ours prefills a 512-token prompt (pipelined across
hops in chunks) and decodes N tokens greedily; llama.cpp's ``llama-bench`` measures pp512
and tgN at depth 512 (after a prompt's worth of context, like ours). Time to first token:
ours measured; llama.cpp's is its pp512 time (llama-bench reports no TTFT). RSS: peak
resident bytes (VmHWM) of every process. Then the kill: ours SIGKILLs the route's
middle server after N/4 tokens and must finish with the undisturbed run's tokens;
llama.cpp's ``llama-completion --rpc`` gets one of its rpc-servers SIGKILLed the same way.

``--shape 8b`` runs the same comparison on a Llama-3-8B-shape model (32 blocks, hidden 4096,
32 heads, 8 KV heads, FFN 14336; blocks 0-11, 11-22, 22-32), into its own docs section.

Run ``make llamacpp-rpc`` first, then ``python benchmarks/big.py [--shape 1b|8b]
[--tokens N] [--rounds R] [--threads T] [--prompt P]``; server data (shards built on first
use) stay in ``.cache/bench-big`` (``--data-dir`` to move them).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from contextlib import aclosing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import trio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import _llamacpp_rpc as rpc  # noqa: E402
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
from benchmarks._shard_servers import Server, stop  # noqa: E402
from p2pedge.ids import LayerRange  # noqa: E402
from p2pedge.node.config import NodeConfig, Tuning  # noqa: E402
from p2pedge.node.node import Node  # noqa: E402
from p2pedge.protocols.pipeline.chain import ClientConfig  # noqa: E402
from p2pedge.protocols.pipeline.serving import (  # noqa: E402
    dir_bytes,
    ensure_shard_dir,
    open_sharded_session,
)
from p2pedge.runtime.config import RuntimeConfig  # noqa: E402
from p2pedge.runtime.shard_session import ShardModel  # noqa: E402
from p2pedge.testing.synthetic_gguf import (  # noqa: E402
    SyntheticShape,
    SyntheticSpec,
    write_synthetic_gguf,
)


@dataclass(frozen=True)
class Big:
    """A synthetic model of a real model's shape, and how three servers split it."""

    name: str
    like: str  # the real model whose shape it has
    gguf: str
    shape: SyntheticShape
    ranges: tuple[str, str, str]

    @property
    def spec(self) -> SyntheticSpec:
        return SyntheticSpec(
            qtype="Q4_0", embd_qtype="Q8_0", tokenizer="llama-spm", shape=self.shape
        )


MODELS = {
    "1b": Big(
        "big1b", "TinyLlama-1.1B", "tinyllama-shape-q4_0.gguf",
        SyntheticShape(
            n_layers=22, hidden=2048, n_heads=32, n_kv_heads=4, ffn=5632, context_length=2048
        ),
        ("0-8", "8-15", "15-22"),
    ),
    "8b": Big(
        "big8b", "Llama-3-8B", "llama3-8b-shape-q4_0.gguf",
        SyntheticShape(
            n_layers=32, hidden=4096, n_heads=32, n_kv_heads=8, ffn=14336, context_length=2048
        ),
        ("0-11", "11-22", "22-32"),
    ),
}  # fmt: skip
REPLICA = 1  # the fourth server holds the middle range again
STEP_TIMEOUT = 120.0
CHUNK = 64
# The stated memory of a shard server beyond the model bytes its budget counts: onnxruntime
# prepacks MatMulNBits weights into a copy half again the size of the 4-bit files, and the
# process (interpreter, trio, libp2p, numpy, onnxruntime, the node) takes ~100 MB more, plus
# arenas and one session's KV.
STATED_FACTOR = 1.5
STATED_FIXED_MB = 200.0


def ensure_model(cache: Path, big: Big) -> tuple[Path, Path]:
    """The GGUF and its imported directory, made once."""
    cache.mkdir(parents=True, exist_ok=True)
    gguf = cache / big.gguf
    if not gguf.is_file():
        print(f"writing {gguf} ...", flush=True)
        write_synthetic_gguf(gguf.with_suffix(".tmp"), big.spec).rename(gguf)
    model_dir = cache / big.name
    if not (model_dir / "model.onnx").is_file():
        print(f"importing into {model_dir} ...", flush=True)
        cmd = [sys.executable, "-m", "p2pedge.models", "import-gguf", str(gguf)]
        subprocess.run([*cmd, "--name", big.name, "--out", str(model_dir)], check=True)
    return gguf, model_dir


def _drain(pipe: Any) -> None:
    for _ in pipe:
        pass


def start_server(
    big: Big, model_dir: Path, root: Path, name: str, layers: str, boot: str | None, threads: int
) -> Server:
    cmd = [sys.executable, "-m", "p2pedge.node", "--json", "--threads", str(threads)]
    cmd += ["--data-dir", str(root / name), "--model", f"{big.name}={model_dir}"]
    cmd += ["--serve", f"{big.name}:{layers}", *(["--bootstrap", boot] if boot else [])]
    (root / name).mkdir(parents=True, exist_ok=True)
    err = (root / name / "stderr.log").open("wb")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, env=env)
    assert proc.stdout is not None
    for line in proc.stdout:
        event = json.loads(line)
        if event["event"] == "listening":
            threading.Thread(target=_drain, args=(proc.stdout,), daemon=True).start()
            return Server(proc, str(event["peer_id"]), str(event["addrs"][0]), layers)
    raise RuntimeError(f"server {name} exited; see {root / name / 'stderr.log'}")


def server_names(big: Big) -> list[tuple[str, str]]:
    return [*((f"shard{i}", r) for i, r in enumerate(big.ranges)), ("replica", big.ranges[REPLICA])]


def shard_dirs(big: Big, root: Path, model_dir: Path) -> dict[str, Path]:
    """Every server's shard directory, built here first (the servers then find them)."""
    return {
        name: ensure_shard_dir(model_dir, LayerRange.parse(r), root / name / "shards")
        for name, r in server_names(big)
    }


def prompt_ids(model_dir: Path, n: int) -> list[int]:
    vocab = int(json.loads((model_dir / "p2pedge_model.json").read_text())["vocab"])
    return [int(t) for t in np.random.default_rng(0).integers(3, vocab, size=n)]


# --- ours -------------------------------------------------------------------------------


async def ours_run(
    big: Big, node: Node, prompt: list[int], tokens: int, kill: Sequence[Server] = ()
) -> dict[str, Any]:
    """Prefill ``prompt`` and decode ``tokens`` greedily, then read the next position's
    logits (so a run is compared on more than its tokens: a random-weight model's greedy
    tokens often repeat). With ``kill`` (the servers), SIGKILL the route's middle server
    after a quarter of the tokens."""
    config = ClientConfig(
        max_length=len(prompt) + tokens + 8, chunk=CHUNK, step_timeout=STEP_TIMEOUT
    )
    session = await open_sharded_session(node.models.ctx, big.name, config=config)
    out: list[int] = []
    times: list[float] = []
    victim = None
    async with session:
        began = time.perf_counter()
        async with aclosing(session.stream(prompt, tokens)) as stream:
            async for token in stream:
                out.append(token)
                times.append(time.perf_counter())
                if kill and len(out) == tokens // 4:
                    victim = session.route[1].peer_id
                    next(s for s in kill if s.peer_id == victim).proc.kill()
        logits = np.asarray(await session.extend([out[-1]]), np.float32).ravel()
        route = [f"{h.layers}" for h in session.route]
        peers = [h.peer_id for h in session.route]
        recoveries = session.recoveries
    return {
        "tokens": out,
        "logits": logits,
        "ttft": times[0] - began,
        "prompt_tps": len(prompt) / (times[0] - began),
        "decode_tps": (len(out) - 1) / (times[-1] - times[0]),
        "route": route,
        "recoveries": recoveries,
        "victim": victim,
        "victim_gone": victim is not None and victim not in peers,
    }


def same_output(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Same greedy tokens, and the next position's logits equal to float rounding."""
    return bool(a["tokens"] == b["tokens"] and np.allclose(a["logits"], b["logits"], atol=1e-3))


def hop_compute(dirs: list[Path], hidden: int, prompt: int, steps: int = 8) -> list[float]:
    """Each hop's decode-step compute at depth ``prompt``, in this process, 1 thread."""
    out = []
    rng = np.random.default_rng(0)
    for d in dirs:
        model = ShardModel.from_dir(d, RuntimeConfig(intra_op_threads=1))
        session = model.new_session(prompt + steps + 1)
        first = model.info.first

        def x(n: int, first: bool = first) -> Any:
            if first:
                return rng.integers(3, 200, size=(1, n)).astype(np.int64)
            return (0.5 * rng.standard_normal((1, n, hidden))).astype(np.float32)

        for start in range(0, prompt, CHUNK):
            session.step(x(CHUNK), start)
        times = []
        for i in range(steps):
            began = time.perf_counter()
            session.step(x(1), prompt + i)
            times.append(time.perf_counter() - began)
        out.append(statistics.median(times))
        del session, model
    return out


# --- the run ----------------------------------------------------------------------------


async def run(args: Any, gguf: Path, model_dir: Path, root: Path) -> tuple[str, dict[str, str]]:
    prompt = prompt_ids(model_dir, args.prompt)
    big: Big = args.big
    dirs = await trio.to_thread.run_sync(shard_dirs, big, root, model_dir)
    weights = {name: dir_bytes(d) for name, d in dirs.items()}
    servers: list[Server] = []
    llama = rpc.RpcServers(3, args.threads, root / "llamacpp")
    ours: dict[str, list[float]] = {"prompt": [], "decode": [], "ttft": []}
    theirs: dict[str, list[float]] = {"prompt": [], "decode": [], "ttft": []}
    client_rss_llama = 0
    try:
        boot = None
        for name, layers in server_names(big):
            servers.append(start_server(big, model_dir, root, name, layers, boot, args.threads))
            boot = boot or servers[0].addr
        print(f"4 shard servers up: {', '.join(s.layers for s in servers)}", flush=True)
        llama.start()
        config = NodeConfig(
            data_dir=root / "client",
            bootstrap=tuple(s.addr for s in servers),
            tuning=Tuning(
                measure_compute=False, shard_step_timeout=STEP_TIMEOUT, threads=args.threads
            ),
        )
        async with Node(config) as node:
            reference: dict[str, Any] | None = None
            for r in range(args.rounds):
                for side in turns(("ours", "llama.cpp"), r):
                    if side == "ours":
                        got = await ours_run(big, node, prompt, args.tokens)
                        reference = reference or got
                        if not same_output(got, reference):
                            raise RuntimeError("greedy tokens differ between rounds")
                        ours["prompt"].append(got["prompt_tps"])
                        ours["decode"].append(got["decode_tps"])
                        ours["ttft"].append(got["ttft"])
                        route = got["route"]
                    else:
                        res = await trio.to_thread.run_sync(
                            rpc.bench, gguf, llama, args.prompt, args.tokens, args.threads
                        )
                        theirs["prompt"].append(res.prompt_tps)
                        theirs["decode"].append(res.decode_tps)
                        theirs["ttft"].append(args.prompt / res.prompt_tps)
                        client_rss_llama = max(client_rss_llama, res.client_rss)
                print(
                    f"round {r}: ours {ours['prompt'][-1]:.1f} / {ours['decode'][-1]:.2f}, "
                    f"llama.cpp rpc {theirs['prompt'][-1]:.1f} / {theirs['decode'][-1]:.2f} "
                    "prompt / decode tok/s",
                    flush=True,
                )
            rss_ours = {
                s.layers + (" (replica)" if i == 3 else ""): rpc.peak_rss(s.proc.pid)
                for i, s in enumerate(servers)
            }
            rss_llama = llama.rss()
            client_rss = rpc.peak_rss(os.getpid())
            killed = await ours_run(big, node, prompt, args.tokens, kill=servers)
            assert reference is not None
            kill_ok = killed["victim_gone"] and same_output(killed, reference)
        llama_kill_ok, llama_why = await trio.to_thread.run_sync(
            rpc.kill_run, gguf, llama, 1, args.tokens * 4, args.threads
        )
    finally:
        stop(servers)
        llama.stop()
    hidden = big.shape.hidden
    compute = await trio.to_thread.run_sync(
        hop_compute, [dirs[f"shard{i}"] for i in range(3)], hidden, args.prompt
    )
    overhead = {
        name: (rss - weights[name]) / 1e6
        for name, rss in zip([n for n, _ in server_names(big)], rss_ours.values(), strict=True)
    }
    bounds = [STATED_FACTOR * weights[n] + STATED_FIXED_MB * 1e6 for n, _ in server_names(big)]
    results = {
        "bounds": bounds,
        "ours": ours,
        "theirs": theirs,
        "route": route,
        "rss_ours": rss_ours,
        "rss_llama": rss_llama,
        "client_rss": client_rss,
        "client_rss_llama": client_rss_llama,
        "weights": weights,
        "overhead": overhead,
        "kill": (kill_ok, killed),
        "llama_kill": (llama_kill_ok, llama_why),
        "compute": compute,
    }
    decode = paired_ratio(ours["decode"], theirs["decode"])
    prefill = paired_ratio(ours["prompt"], theirs["prompt"])
    fields = {
        **ratio_fields("decode_vs_llamacpp_rpc", decode),
        **ratio_fields("prefill_vs_llamacpp_rpc", prefill),
        "rss_overhead_mb": f"{max(overhead.values()):.0f}",
        "kill_survived": str(int(kill_ok)),
        "llamacpp_rpc_kill_survived": str(int(llama_kill_ok)),
    }
    return report(results, args), fields


def report(res: dict[str, Any], args: Any) -> str:
    big: Big = args.big
    ours, theirs = res["ours"], res["theirs"]
    med = statistics.median
    decode = paired_ratio(ours["decode"], theirs["decode"])
    prefill = paired_ratio(ours["prompt"], theirs["prompt"])
    ttft = paired_ratio(theirs["ttft"], ours["ttft"])
    kill_ok, killed = res["kill"]
    llama_ok, llama_why = res["llama_kill"]
    per_token = 1.0 / med(ours["decode"])
    compute = res["compute"]
    rest = max(per_token - sum(compute), 0.0)
    rows: list[list[object]] = [
        [
            "decode tok/s (batch 1, after the 512-token prompt)",
            f"{med(ours['decode']):.2f}",
            f"{med(theirs['decode']):.2f}",
            f"{ratio_cell(decode)}",
        ],
        [
            f"prompt tok/s ({args.prompt} tokens; ours in chunks of {CHUNK} pipelined across hops)",
            f"{med(ours['prompt']):.1f}",
            f"{med(theirs['prompt']):.1f}",
            f"{ratio_cell(prefill)}",
        ],
        [
            "time to first token (llama.cpp: its pp512 time)",
            f"{med(ours['ttft']):.2f} s",
            f"{med(theirs['ttft']):.2f} s",
            f"llama.cpp / ours {ratio_cell(ttft)}",
        ],
        [
            "peak RSS per server process, MB",
            rpc.summary(list(res["rss_ours"].values())) + " (last: the replica)",
            rpc.summary(res["rss_llama"]),
            "",
        ],
        [
            "peak RSS of the client process, MB",
            f"{res['client_rss'] / 1e6:.0f} (a whole Node)",
            f"{res['client_rss_llama'] / 1e6:.0f} (llama-bench)",
            "",
        ],
        [
            "server RSS beyond its shard files (graph + weights), MB",
            " / ".join(f"{v:.0f}" for v in res["overhead"].values()),
            "",
            "prepacked weights, the Python process, onnxruntime, KV for one session",
        ],
        [
            f"server RSS within files x {STATED_FACTOR} + {STATED_FIXED_MB:.0f} MB (stated)",
            " / ".join(
                f"{rss / 1e6:.0f} of {bound / 1e6:.0f}: {'yes' if rss <= bound else 'NO'}"
                for rss, bound in zip(res["rss_ours"].values(), res["bounds"], strict=True)
            ),
            "",
            "measured peak RSS against the stated bound",
        ],
        [
            "kill one server mid-generation",
            f"{'finished: same greedy tokens and next logits' if kill_ok else 'FAILED'} "
            f"({killed['recoveries']} recovery, onto the replica)",
            f"{'finished' if llama_ok else 'aborted'} ({llama_why})",
            "",
        ],
        [
            "where a decode token goes (ours): per-hop compute in-process at depth 512",
            " + ".join(f"{c * 1000:.0f}" for c in compute) + f" = {sum(compute) * 1000:.0f} ms",
            "",
            f"of {per_token * 1000:.0f} ms a token: {rest * 1000:.0f} ms "
            f"({rest * 1000 / 3:.0f} ms a hop) in transport, framing, wake-ups and the client",
        ],
    ]
    notes = [
        f"Model: synthetic {big.name} (random Q4_0 weights, {big.like} shape, small vocabulary), "
        f"{sum(res['weights'][f'shard{i}'] for i in range(3)) / 1e6:.0f} MB of shard files over "
        f"the three servers ({', '.join(big.ranges)}; route {' -> '.join(res['route'])}).",
        f"Threads: {args.threads} per server process on both sides; {args.tokens} tokens decoded; "
        f"{args.rounds} rounds, the two sides taking turns to go first. {RATIO_DEFINITION}",
        "llama.cpp decode is llama-bench's tg at depth 512 (same context as ours), its prompt "
        "speed pp512 at depth 0; it runs every layer on the RPC servers (-ngl 99) with "
        "--repack 0.",
        "Harness: every process on this one machine (2 cores; the load average above says "
        "what else ran): "
        "loopback hops, compute contending for the same cores; ours has a fourth (idle) server "
        f"process, the replica of blocks {big.ranges[REPLICA]} that the kill test needs.",
    ]
    headers = [
        "measure",
        "ours (p2pedge, 3 shard servers)",
        "llama.cpp RPC (3 rpc-servers)",
        "ours / llama.cpp",
    ]
    return table(headers, rows) + "\n\n" + "\n".join(f"- {n}" for n in notes)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(MODELS), default="1b", help="the model's shape")
    ap.add_argument("--tokens", type=int, default=32, help="new tokens per run")
    ap.add_argument("--prompt", type=int, default=512, help="prompt tokens")
    ap.add_argument("--rounds", type=int, default=3, help="timed runs per side")
    ap.add_argument("--threads", type=int, default=1, help="compute threads per process")
    ap.add_argument("--data-dir", type=Path, default=None, help="server dirs (shards are kept)")
    ap.add_argument("--no-doc", action="store_true", help="do not update docs/benchmarks.md")
    args = ap.parse_args(argv)
    why = rpc.available()
    if why:
        print(why, file=sys.stderr)
        return 2
    args.big = MODELS[args.shape]
    gguf, model_dir = ensure_model(ROOT / ".cache" / "big", args.big)
    suffix = "" if args.big.name == "big1b" else args.big.name.removeprefix("big")
    root = args.data_dir or ROOT / ".cache" / f"bench-big{suffix}"
    began = time.perf_counter()
    body, fields = trio.run(run, args, gguf, model_dir, root)
    print(body)
    print(f"(took {time.perf_counter() - began:.0f} s)")
    if not args.no_doc:
        name = args.big.name
        title = f"## Big model vs llama.cpp RPC (`benchmarks/big.py`): {name}, 3 processes"
        write_section("big" if name == "big1b" else name, f"{title}\n\n{machine()}\n\n{body}\n")
    print(headline(fields))
    return 0


if __name__ == "__main__":
    sys.exit(main())
