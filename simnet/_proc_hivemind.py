"""hivemind's DHT in its own process, with the same JSON-line commands as ``_proc_node``.

The baseline for ``simnet.processes --hivemind PYTHON``: run by an interpreter whose
environment has hivemind (a benchmark-only install, never a p2pedge dependency). Each
process stores one value of a card's size under ``card/<peer id>`` and looks the others'
up with ``DHT.get(latest=True)``, concurrently, as ``_proc_node`` does with cards.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from functools import partial
from typing import Any

CARD_BYTES = 1500  # about the size of a signed p2pedge card
TTL_S = 600.0


def _emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def _mark(done_at: dict[str, float], peer: str, _future: Any) -> None:
    done_at.setdefault(peer, time.perf_counter())


def main() -> None:
    parser = argparse.ArgumentParser(prog="simnet._proc_hivemind")
    parser.add_argument("--bootstrap", action="append", default=[])
    args = parser.parse_args()
    import hivemind  # type: ignore[import-not-found]
    from hivemind.utils.timed_storage import get_dht_time  # type: ignore[import-not-found]

    dht = hivemind.DHT(
        initial_peers=args.bootstrap, host_maddrs=["/ip4/127.0.0.1/tcp/0"], start=True
    )
    me = str(dht.peer_id)
    stored = dht.store(f"card/{me}", os.urandom(CARD_BYTES), get_dht_time() + TTL_S)
    addr = next(str(a) for a in dht.get_visible_maddrs() if "127.0.0.1" in str(a))
    _emit({"ready": me, "addr": addr, "pid": os.getpid(), "stored": bool(stored)})
    for line in sys.stdin:
        command = json.loads(line)
        if command.get("op") == "quit":
            break
        if command.get("op") != "find":
            continue
        timeout = float(command.get("timeout", 10))
        start = time.perf_counter()
        futures: dict[str, Any] = {}
        done_at: dict[str, float] = {}
        for peer in command["peers"]:
            futures[peer] = dht.get(f"card/{peer}", latest=True, return_future=True)
            futures[peer].add_done_callback(partial(_mark, done_at, peer))
        found, ms = [], []
        for peer, future in futures.items():
            try:
                value = future.result(timeout=timeout)
            except Exception:  # a timed-out or failed lookup counts as not found
                value = None
            if value is not None:
                found.append(peer)
                ms.append((done_at.get(peer, time.perf_counter()) - start) * 1000)
        _emit({"found": found, "ms": ms})
    dht.shutdown()


if __name__ == "__main__":
    main()
