"""A js-libp2p peer (from npm, Node.js) dials a real p2pedge node and uses its DHT.

js-libp2p 3 with ``@libp2p/kad-dht`` configured with p2pedge's protocol id: it dials,
pings and identifies the node, takes it into its routing table, reads the node's signed
card through Kademlia ``GET_VALUE`` and finds a provider record through
``GET_PROVIDERS``. ``make jsinterop`` installs the pinned npm packages; the test is
skipped only where Node.js itself is absent.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import trio

from p2pedge.dht.directory import provider_key
from p2pedge.node.config import NodeConfig
from p2pedge.node.node import Node
from p2pedge.records.card import card_key, verify_card

ROOT = Path(__file__).resolve().parents[2]
JS_DIR = ROOT / ".cache" / "jsinterop"
SCRIPT = Path(__file__).with_name("js_peer.mjs")

pytestmark = pytest.mark.skipif(shutil.which("node") is None, reason="Node.js is not installed")


def _steps(stdout: bytes) -> dict[str, dict[str, object]]:
    steps = {}
    for line in stdout.decode().splitlines():
        if line.startswith("{"):
            step = json.loads(line)
            steps[str(step["step"])] = step
    return steps


async def test_js_libp2p_peer_reads_cards_and_providers(
    config: Callable[..., NodeConfig],
) -> None:
    if not (JS_DIR / "node_modules" / "libp2p").is_dir():
        pytest.fail("js-libp2p is not installed: run `make jsinterop` (make test does)")
    # the script must sit beside node_modules for Node's ESM resolution
    shutil.copyfile(SCRIPT, JS_DIR / SCRIPT.name)
    async with Node(config("py")) as node:
        peer_id = node.peer_id
        await node.announced()
        await node.peers.provide("model/interop")
        key = provider_key("model/interop")
        with trio.fail_after(60):
            result = await trio.run_process(
                ["node", str(JS_DIR / SCRIPT.name), node.addrs[0], card_key(node.peer_id), key],
                capture_stdout=True,
                capture_stderr=True,
                check=False,
                cwd=str(JS_DIR),
            )
        now = time.time()
    steps = _steps(result.stdout)
    assert "error" not in steps, (steps, result.stderr.decode()[-2000:])
    assert steps["routing_table"]["ok"], steps
    assert steps["ping"]["ok"] and steps["identify"]["ok"], steps
    assert steps["get_card"]["ok"], steps
    card = verify_card(bytes.fromhex(str(steps["get_card"]["hex"])), now)
    assert card.peer_id == peer_id
    assert steps["find_providers"]["ok"], steps
    assert result.returncode == 0
