"""An idle node does not load the model stack: onnxruntime-genai, onnx and tokenizers
come with the first model a node loads or imports, not with joining a swarm."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = """
import json, sys, tempfile, trio
from p2pedge import Node, NodeConfig, Tuning

async def main():
    config = NodeConfig(data_dir=tempfile.mkdtemp(), tuning=Tuning(measure_compute=False))
    async with Node(config) as node:
        await node.announced()
    print(json.dumps(sorted({m.split(".")[0] for m in sys.modules})))

trio.run(main)
"""


def test_an_idle_networked_node_leaves_the_model_stack_unloaded(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120, check=True
    )
    loaded = set(json.loads(out.stdout.strip().splitlines()[-1]))
    assert "libp2p" in loaded and "trio" in loaded  # it did run a networked node
    assert not loaded & {"onnxruntime_genai", "onnx", "tokenizers"}, loaded
