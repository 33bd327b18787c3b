"""A p2pedge node in its own process, driven over JSON lines (for namespace tests).

``python -m p2pedge.testing.reach_driver --listen /ip4/192.168.1.2/tcp/4001 ...`` starts
a :class:`~p2pedge.Node` configured for the :mod:`p2pedge.reach` services (relay,
reservations, hole punching, mDNS), prints ``{"event": "ready", ...}``, then answers one JSON
request per stdin line with one JSON line (``event`` = the request's ``op``, or
``error``). Closing stdin stops the node and exits 0.

Ops: ``card`` (peer), ``connect`` (addr), ``dial`` (addrs: circuit addresses),
``echo`` (peer, size: one round trip on a p2pedge stream; rtt_ms and connection kinds),
``kinds`` (peer), ``wait`` (peer, kind, within, open: until a connection of that kind is
open, or with open=false closed), ``punch`` (peer), ``announce``, ``complete`` (model,
prompt, route, n: token ids), ``lookup`` (refresh the routing table), ``publish`` (dir, model,
key), ``pull`` (model: the local directory), ``reach`` (servers:
AutoNAT dial-backs; public, private or unknown).
Events without a request: ``reserved`` (addrs) whenever the relay addresses change.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

from p2pedge.errors import P2PEdgeError
from p2pedge.node.config import NodeConfig, Reach, ServeSpec, Tuning
from p2pedge.node.node import Node
from p2pedge.protocols._stream import FramedStream
from p2pedge.reach.autonat import check_reachability
from p2pedge.reach.client import dial_any
from p2pedge.reach.punch import (
    ConnectionWatch,
    connection_kinds,
    punch,
    stream_kind,
)
from p2pedge.reach.relay import RelayPolicy

ECHO = "/p2pedge/reach-echo/1"


def emit(event: str, **fields: Any) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


async def echo_handler(stream: FramedStream, remote: str) -> None:
    while True:
        try:
            payload = await stream.receive_bytes(timeout=30)
        except P2PEdgeError:
            return
        await stream.send_bytes(payload)


async def serve(args: argparse.Namespace) -> None:
    data_dir = Path(tempfile.mkdtemp(prefix="reach-"))
    config = NodeConfig(
        data_dir=data_dir,
        listen=tuple(args.listen),
        bootstrap=tuple(args.bootstrap),
        tuning=Tuning(
            measure_compute=False,
            announce_interval=30.0,
            dht_timeout=3.0,
            self_lookup=False,
        ),
        reach=Reach(
            mdns=args.mdns,
            relay=RelayPolicy(circuit_bytes=args.relay_bytes) if args.relay else None,
            reserve=tuple(args.reserve),
            hole_punch=args.punch,
        ),
        serve=tuple(ServeSpec.parse(spec) for spec in args.serve),
        trusted_publishers=tuple(Path(p) for p in args.trust),
        model_dirs=tuple(
            (name, Path(path)) for name, _, path in (m.partition("=") for m in args.model)
        ),
    )
    node = Node(config)
    node.set_stream_handler(ECHO, echo_handler)
    record_lanes(node)
    async with node:
        host = node.host
        watch = ConnectionWatch(host)
        if args.reserve:
            node.nursery.start_soon(report_reservations, node)
        if args.mdns:
            node.nursery.start_soon(report_mdns, node)
        emit("ready", peer_id=node.peer_id, addrs=node.addrs)
        stdin = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
        buffer = b""
        while True:
            chunk = await stdin.receive_some(65536)
            if not chunk:
                break
            buffer += chunk
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                request = json.loads(line)
                try:
                    reply = await handle(node, watch, request)
                except (P2PEdgeError, OSError, KeyError, ValueError) as exc:
                    emit("error", op=request.get("op"), error=f"{type(exc).__name__}: {exc}")
                    continue
                emit(request["op"], **reply)


LANES_TO: dict[str, list[str]] = {}  # peer id -> protocols whose lane opened, for "lanes"


def record_lanes(node: Node) -> None:
    """Note which peer and protocol each direct-lane stream went to."""
    lanes, original = node.lanes, node.lanes.open

    async def open_and_note(peer_id: str, protocol_id: str, *, timeout: float) -> Any:
        before = lanes.opened
        stream = await original(peer_id, protocol_id, timeout=timeout)
        if lanes.opened > before:
            LANES_TO.setdefault(peer_id, []).append(protocol_id)
        return stream

    lanes.open = open_and_note  # type: ignore[method-assign]


async def report_reservations(node: Node) -> None:
    """Say ``reserved`` once the card naming the relay addresses has been announced."""
    last: tuple[str, ...] = ()
    while True:
        await node.announcer.next_announce()
        addrs = node.network.relay_addrs
        if addrs != last:
            last = addrs
            emit("reserved", addrs=list(addrs))


async def report_mdns(node: Node) -> None:
    """Say ``mdns`` for each peer the node connected to: with no bootstrap address given,
    only mDNS discovery (the node's own dialing of what it finds) can connect one."""
    watch = ConnectionWatch(node.host)
    seen: set[str] = set()
    while True:
        changed = watch.changed
        for peer in node.host.get_connected_peers():
            if peer.to_base58() not in seen:
                seen.add(peer.to_base58())
                emit("mdns", peer=peer.to_base58())
        await changed.wait()


async def handle(node: Node, watch: ConnectionWatch, request: dict[str, Any]) -> dict[str, Any]:
    dcutr, nat = node.network.hole_punch, node.network.autonat
    op = request["op"]
    host = node.host
    if op == "card":
        card = await node.card_of(request["peer"], refresh=True)
        return {"addrs": list(card.addrs) if card else None}
    if op == "connect":
        return {"peer": await node.connect(request["addr"])}
    if op == "dial":
        return {"peer": await dial_any(host, request["addrs"])}
    if op == "echo":
        payload = os.urandom(int(request.get("size", 32)))
        stream = await node.open_stream(request["peer"], ECHO)
        via = stream_kind(host, request["peer"], stream.stream)
        try:
            rounds = int(request.get("rounds", 1))
            start = time.perf_counter()
            for _ in range(rounds):
                await stream.send_bytes(payload)
                back = await stream.receive_bytes(timeout=float(request.get("timeout", 20)))
                if back != payload:
                    raise P2PEdgeError("echo came back different")
            elapsed = time.perf_counter() - start
        finally:
            await stream.close()
        return {
            "rtt_ms": elapsed / rounds * 1000,
            "mb_s": 2 * len(payload) * rounds / elapsed / 1e6,
            "via": via,
            "kinds": connection_kinds(host, request["peer"]),
        }
    if op == "announce":
        node.announcer.refresh()
        directory = node.network.require_directory()
        stored = await directory.put_card(node.announcer.record, node.peer_id)
        return {"stored": stored}
    if op == "complete":
        completion = await node.complete(
            request["model"],
            messages=[{"role": "user", "content": request["prompt"]}],
            max_tokens=int(request.get("n", 8)),
            route=request["route"],
        )
        return {"tokens": list(completion.token_ids)}
    if op == "publish":
        manifest = await node.publish(Path(request["dir"]), request["model"], Path(request["key"]))
        return {"files": len(manifest.files)}
    if op == "pull":
        pulled = await node.pull(request["model"])
        return {"dir": str(pulled)}
    if op == "lookup":  # what a routing-table refresh does: learn peers near our id
        await node.network.self_lookup()
        return {"known": node.network.known_peers()}
    if op == "reach":
        return {"reachability": await check_reachability(nat, request["servers"])}
    if op == "kinds":
        return {"kinds": connection_kinds(host, request["peer"])}
    if op == "lanes":  # direct-lane streams opened, and dials that fell back to libp2p
        return {"opened": LANES_TO, "fallbacks": node.lanes.fallbacks}
    if op == "wait":
        opened = bool(request.get("open", True))
        await watch.wait_for(
            request["peer"], request["kind"], float(request["within"]), open=opened
        )
        return {"kinds": connection_kinds(host, request["peer"])}
    if op == "punch":
        ok = await punch(dcutr, request["peer"]) if dcutr is not None else False
        return {"direct": ok, "kinds": connection_kinds(host, request["peer"])}
    raise P2PEdgeError(f"unknown op {op!r}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--listen", action="append", default=[])
    parser.add_argument("--bootstrap", action="append", default=[])
    parser.add_argument("--relay", action="store_true", help="serve circuit v2 hop")
    parser.add_argument("--relay-bytes", type=int, default=1 << 20)
    parser.add_argument("--reserve", action="append", default=[], help="relay to reserve on")
    parser.add_argument("--punch", action="store_true", help="run DCUtR")
    parser.add_argument("--mdns", action="store_true")
    parser.add_argument("--model", action="append", default=[], help="NAME=DIR")
    parser.add_argument("--serve", action="append", default=[], help="MODEL[:START-END]")
    parser.add_argument("--trust", action="append", default=[], help="publisher .pub file")
    args = parser.parse_args()
    if os.environ.get("REACH_DEBUG"):  # e.g. libp2p.relay: that library's relay/DCUtR logs
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(relativeCreated)d %(name)s %(message)s"))
        for name in os.environ["REACH_DEBUG"].split(","):
            logger = logging.getLogger(name)
            logger.setLevel(logging.DEBUG)
            logger.addHandler(handler)
            logger.propagate = False
    try:
        trio.run(serve, args)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
