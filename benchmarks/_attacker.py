"""The hostile side of ``benchmarks/hostile.py``: one process, a real node, a mixed attack.

Run as ``python -m benchmarks._attacker TARGETS.json``: it starts a p2pedge ``Node`` with its
own identity on 127.0.0.2 (another source address than the honest client), prints
``{"event": "attacking"}`` once every attack runs, and attacks the honest shard servers
named in the JSON file until SIGINT, then prints its counts as one JSON line and exits 0.

Each attack is a loop at a bounded rate (this process shares the machine's two cores with
the honest side; the rates are what one home device could send): malformed messages on
every protocol, pipeline session hoarding, 255-token step floods, blob requests left
unread (slow reader), silent TCP connections to the lane port, junk DHT puts, and a pull
source that claims the model and never answers. What
each attempt got back (a typed refusal, a closed stream) is counted by kind.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import sys
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
import trio

from p2pedge.errors import P2PEdgeError
from p2pedge.node.config import NodeConfig, Tuning
from p2pedge.node.node import Node
from p2pedge.protocols._stream import FramedStream
from p2pedge.protocols.blob import codec as blob
from p2pedge.protocols.infer import codec as infer
from p2pedge.protocols.pipeline import codec as pipe
from p2pedge.records.keys import model_key
from p2pedge.wire.messages import pack

BAD_PEER = "0OIl" * 11  # the right length, not base58
RATE_HZ = 20.0  # attempts per second per attack loop
HOARD_SESSIONS = 64
FLOOD_STREAMS = 8
FLOOD_TOKENS = 255
SILENT_CONNECTIONS = 64
JUNK_VALUE = 64 * 1024

Attack = Callable[[Node, dict[str, Any], Counter[str]], Awaitable[None]]


def _note(counts: Counter[str], kind: str, exc: BaseException | None) -> None:
    counts[f"{kind}:{type(exc).__name__ if exc else 'ok'}"] += 1


async def _raw(node: Node, peer: str, protocol: str, payload: bytes, *, read: bool = True) -> None:
    """Write ``payload`` as is on a fresh stream; read one frame back when asked."""
    stream = await node.open_stream(peer, protocol, timeout=5)
    try:
        await stream.stream.write(payload)
        if read:
            await stream.receive_bytes(timeout=5)
    finally:
        with trio.move_on_after(1):
            await stream.reset()


def _frame(message: dict[str, Any]) -> bytes:
    body = pack(message)
    return len(body).to_bytes(4, "big") + body


def _infer_params(**bad: int) -> dict[str, Any]:
    params = {"max_tokens": 8, "temperature": 0.0, "top_p": 1.0, "top_k": 0, "seed": 0}
    params.update(bad)
    prompt = {"t": "infer", "v": 1, "id": 1, "model": "smollm2-135m-instruct", "prompt": "hi"}
    return {**prompt, "specialist": "", "params": {**params, "stop": []}}


MALFORMED: tuple[tuple[str, str, bytes], ...] = (
    ("blob_oversize_frame", blob.PROTOCOL_ID, (1 << 30).to_bytes(4, "big") + b"x" * 64),
    (
        "blob_index_2_32",
        blob.PROTOCOL_ID,
        _frame({"op": "chunk", "digest": "0" * 64, "index": 2**32 - 1, "chunk_size": 1 << 20}),
    ),
    (
        "pipeline_open_bad_next",
        pipe.PROTOCOL_ID,
        _frame(
            {
                "t": "open",
                "rid": 1,
                "model": "smollm2-135m-instruct",
                "start": 0,
                "end": 10,
                "max_length": 64,
                "dtype": "float32",
                "next": BAD_PEER,
            }
        ),
    ),
    ("pipeline_garbage", pipe.PROTOCOL_ID, _frame({"t": "step", "rid": "x", "x": [1] * 100})),
    ("infer_seed_2_31", infer.PROTOCOL_ID, _frame(_infer_params(seed=2**31))),
    ("infer_top_k_2_40", infer.PROTOCOL_ID, _frame(_infer_params(top_k=2**40))),
    ("random_bytes", blob.PROTOCOL_ID, os.urandom(512)),
)


async def malformed(node: Node, targets: dict[str, Any], counts: Counter[str]) -> None:
    i = 0
    while True:
        for server in targets["servers"]:
            kind, protocol, payload = MALFORMED[i % len(MALFORMED)]
            try:
                await _raw(node, server["peer_id"], protocol, payload)
                _note(counts, kind, None)
            except P2PEdgeError as exc:
                _note(counts, kind, exc)
        i += 1
        await trio.sleep(1 / RATE_HZ)


def _open(rid: int, server: dict[str, Any], max_length: int) -> bytes:
    start, end = server["layers"]
    return pipe.encode(
        pipe.Open(rid, targets_model(server), start, end, max_length), pipe.MAX_FRAME
    )


def targets_model(server: dict[str, Any]) -> str:
    return str(server["model"])


async def hoard(node: Node, targets: dict[str, Any], counts: Counter[str]) -> None:
    """Open sessions with the longest context on many streams and hold them."""
    held: list[FramedStream] = []
    try:
        for n in range(HOARD_SESSIONS):
            for server in targets["servers"]:
                try:
                    stream = await node.open_stream(server["peer_id"], pipe.PROTOCOL_ID)
                    await stream.send_bytes(_open(n + 1, server, 2048)[4:])
                    reply = pipe.from_map(await stream.receive(timeout=5))
                    _note(counts, f"hoard_{type(reply).__name__.lower()}", None)
                    held.append(stream)
                except P2PEdgeError as exc:
                    _note(counts, "hoard", exc)
            await trio.sleep(1 / RATE_HZ)
        await trio.sleep_forever()
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(2):
            for stream in held:
                await stream.reset()


async def flood(node: Node, targets: dict[str, Any], counts: Counter[str]) -> None:
    """255-token prompt steps on several streams to the first shard, back to back."""
    first = next(s for s in targets["servers"] if s["layers"][0] == 0)

    async def one(k: int) -> None:
        try:
            stream = await node.open_stream(first["peer_id"], pipe.PROTOCOL_ID)
            await stream.send_bytes(_open(1, first, FLOOD_TOKENS + 1)[4:])
            opened = pipe.from_map(await stream.receive(timeout=5))
        except P2PEdgeError as exc:
            _note(counts, "flood_open", exc)
            return
        if not isinstance(opened, pipe.Opened):
            _note(counts, f"flood_open_{type(opened).__name__.lower()}", None)
            return
        ids = np.full((1, FLOOD_TOKENS), 42, dtype=np.int64)
        rid = 2
        while True:
            try:
                await stream.send_bytes(
                    pipe.encode(pipe.Step(rid, opened.session, 0, ids, top_k=1))[4:]
                )
                reply = pipe.from_map(await stream.receive(timeout=30))
                _note(counts, f"flood_{type(reply).__name__.lower()}", None)
            except P2PEdgeError as exc:
                _note(counts, "flood", exc)
                return
            rid += 1

    async with trio.open_nursery() as nursery:
        for k in range(FLOOD_STREAMS):
            nursery.start_soon(one, k)


async def slow_reader(node: Node, targets: dict[str, Any], counts: Counter[str]) -> None:
    """Ask for many large chunks and never read a reply."""
    held = []
    try:
        for server in targets["servers"]:
            for digest in server.get("digests", [])[:4]:
                try:
                    stream = await node.open_stream(server["peer_id"], blob.PROTOCOL_ID)
                    for index in range(300):
                        request = blob.ChunkRequest(digest, index % 8, blob.MAX_CHUNK)
                        await stream.stream.write(blob.encode_request(request))
                    held.append(stream)
                    _note(counts, "slow_reader", None)
                except P2PEdgeError as exc:
                    _note(counts, "slow_reader", exc)
        await trio.sleep_forever()
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(2):
            for stream in held:
                await stream.reset()


async def silent_lane(node: Node, targets: dict[str, Any], counts: Counter[str]) -> None:
    """Connect to each lane port and say nothing."""
    held: list[trio.SocketStream] = []
    try:
        for server in targets["servers"]:
            for _ in range(SILENT_CONNECTIONS):
                try:
                    held.append(await trio.open_tcp_stream("127.0.0.1", server["lane_port"]))
                    _note(counts, "silent_lane", None)
                except OSError as exc:
                    _note(counts, "silent_lane", exc)
        await trio.sleep_forever()
    finally:
        for sock in held:
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                await sock.aclose()


async def junk_dht(node: Node, targets: dict[str, Any], counts: Counter[str]) -> None:
    """Raw Kademlia PUT_VALUEs at every server: large values under namespaces that are not
    ours and unsigned "cards" (sent straight to the victims' DHT handlers, bypassing the
    attacker's own DHT, which would refuse to send them)."""
    from libp2p.peer.id import ID
    from libp2p.records.record import make_signed_put_record

    assert node.directory is not None
    store = node.directory.dht.value_store
    private_key = node.host.get_private_key()
    i = 0
    while True:
        for server in targets["servers"]:
            key = (f"/junk/{i}" if i % 2 else f"/p2pcard/{i:024x}").encode()
            value = os.urandom(JUNK_VALUE)
            record = make_signed_put_record(key, value, private_key)
            try:
                with trio.fail_after(5):
                    accepted = await store._store_at_peer(
                        ID.from_base58(server["peer_id"]), key, value, record
                    )
                counts["junk_dht:" + ("stored" if accepted else "refused")] += 1
            except (P2PEdgeError, trio.TooSlowError, OSError) as exc:
                _note(counts, "junk_dht", exc)
        i += 1
        await trio.sleep(1 / RATE_HZ)


async def hanging_source(node: Node, targets: dict[str, Any], counts: Counter[str]) -> None:
    """Claim to hold the model, then take every chunk or manifest request and never answer."""

    async def never_answer(stream: FramedStream, peer: str) -> None:
        await stream.receive_bytes()
        counts["hanging_source:held"] += 1
        await trio.sleep_forever()

    node.set_stream_handler(blob.PROTOCOL_ID, never_answer)
    while True:
        try:
            await node.peers.provide(model_key(str(targets["servers"][0]["model"])))
            _note(counts, "hanging_source_provide", None)
        except P2PEdgeError as exc:
            _note(counts, "hanging_source_provide", exc)
        await trio.sleep(10)


ATTACKS: dict[str, Attack] = {
    "malformed": malformed,
    "hoard": hoard,
    "flood": flood,
    "slow_reader": slow_reader,
    "silent_lane": silent_lane,
    "junk_dht": junk_dht,
    "hanging_source": hanging_source,
}


async def main(path: Path) -> None:
    targets = json.loads(path.read_text())
    config = NodeConfig(
        data_dir=Path(targets["data_dir"]),
        listen=("/ip4/127.0.0.2/tcp/0",),
        bootstrap=tuple(s["addr"] for s in targets["servers"]),
        tuning=Tuning(measure_compute=False, announce_on_start=False),
    )
    counts: Counter[str] = Counter()
    stop = trio.Event()

    async def on_signal() -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for _ in signals:
                stop.set()
                return

    # hoarding runs from a second peer id on the same address, so that it and the flood
    # each get a peer's share every round (with one id they raced for the same sessions)
    hoarder = dataclasses.replace(config, data_dir=Path(targets["data_dir"]) / "hoarder")
    async with Node(config) as node, Node(hoarder) as second, trio.open_nursery() as nursery:
        nursery.start_soon(on_signal)
        for name in targets.get("attacks", list(ATTACKS)):

            async def run(attack: Attack = ATTACKS[name], kind: str = name) -> None:
                try:
                    await attack(second if kind == "hoard" else node, targets, counts)
                except P2PEdgeError as exc:
                    _note(counts, f"{kind}_ended", exc)

            nursery.start_soon(run)
        print(json.dumps({"event": "attacking"}), flush=True)
        await stop.wait()
        nursery.cancel_scope.cancel()
    print(json.dumps({"event": "counts", "counts": dict(counts)}), flush=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


if __name__ == "__main__":
    trio.run(main, Path(sys.argv[1]))
