"""One real node in its own process, driven over stdin/stdout by ``simnet.processes``.

Not a library path: a harness driver. It starts an ordinary ``p2pedge.Node`` that joins
by Kademlia bootstrap from the seeds given on the command line (no pre-filled tables),
prints ``{"ready": ...}`` after its first announce, then answers JSON-line commands:

- ``{"op": "find", "peers": [...]}``: look up each card on the DHT (never from the local
  cache) and answer ``{"found": [...], "ms": [...]}`` with each lookup's latency;
- ``{"op": "quit"}`` (or end of input): leave cleanly.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import trio

from p2pedge.errors import P2PEdgeError
from p2pedge.node.config import NodeConfig
from p2pedge.node.node import Node

MAX_LINE = 1 << 20
CONCURRENT_LOOKUPS = 8


def _emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


async def _lines(stream: trio.lowlevel.FdStream) -> Any:
    buffer = b""
    while True:
        chunk = await stream.receive_some(65536)
        if not chunk:
            return
        buffer += chunk
        if len(buffer) > MAX_LINE:
            raise ValueError("command line too long")
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            if line.strip():
                yield json.loads(line)


async def _find(node: Node, peers: list[str], timeout: float) -> dict[str, Any]:
    found: list[str] = []
    ms: list[float] = []
    limiter = trio.CapacityLimiter(CONCURRENT_LOOKUPS)

    async def one(peer: str) -> None:
        async with limiter:  # a few lookups at a time, as a client's find_peers would
            await lookup(peer)

    async def lookup(peer: str) -> None:
        start = time.perf_counter()
        with trio.move_on_after(timeout):
            try:
                card = await node.card_of(peer, refresh=True)
            except P2PEdgeError:
                return
            if card is not None and card.peer_id == peer:
                found.append(peer)
                ms.append((time.perf_counter() - start) * 1000)

    async with trio.open_nursery() as nursery:
        for peer in peers:
            nursery.start_soon(one, peer)
    return {"found": found, "ms": ms}


def _conns(node: Node) -> int:
    """Peers this node holds a connection to (harness figure: how many handshakes a
    join cost it, one per peer)."""
    return len(node.network.host.get_network().connections)


async def _main(args: argparse.Namespace) -> None:
    config = NodeConfig(
        data_dir=args.data_dir,
        listen=(f"/ip4/{args.host}/tcp/0",),
        bootstrap=tuple(args.bootstrap),
    )
    async with Node(config) as node:
        await node.announced()
        ready = {"ready": node.peer_id, "addr": node.addrs[0], "pid": os.getpid()}
        _emit(ready | {"conns": _conns(node)})
        stdin = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
        async for command in _lines(stdin):
            if command.get("op") == "find":
                reply = await _find(node, list(command["peers"]), float(command.get("timeout", 10)))
                _emit(reply | {"conns": _conns(node)})
            elif command.get("op") == "quit":
                break


def main() -> None:
    parser = argparse.ArgumentParser(prog="simnet._proc_node")
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--bootstrap", action="append", default=[])
    args = parser.parse_args()
    try:
        trio.run(_main, args)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
