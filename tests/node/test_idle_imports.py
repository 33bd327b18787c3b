"""An idle node does not load the model stack: onnxruntime (its providers come from a
cached child-process probe), onnxruntime-genai, onnx and tokenizers come with the first
model a node loads or imports, not with joining a swarm."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import onnxruntime
import pytest

from p2pedge.node import hardware
from p2pedge.node.hardware import PROVIDERS_CACHE, execution_providers

SCRIPT = """
import json, sys, trio
from p2pedge import Node, NodeConfig, Tuning

async def main():
    config = NodeConfig(data_dir=sys.argv[1], tuning=Tuning(measure_compute=False))
    async with Node(config) as node:
        await node.announced()
        providers = list(node.card.execution_providers)
    print(json.dumps([sorted({m.split(".")[0] for m in sys.modules}), providers]))

trio.run(main)
"""


def test_an_idle_networked_node_leaves_the_model_stack_unloaded(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    modules, providers = json.loads(out.stdout.strip().splitlines()[-1])
    loaded = set(modules)
    assert "libp2p" in loaded and "trio" in loaded  # it did run a networked node
    assert not loaded & {"onnxruntime", "onnxruntime_genai", "onnx", "tokenizers"}, loaded
    # its card still names what onnxruntime offers here, and the answer is cached
    assert providers == onnxruntime.get_available_providers()
    assert json.loads((tmp_path / PROVIDERS_CACHE).read_text())["providers"] == providers


def test_the_providers_cache_is_read_when_current_and_reprobed_when_not(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    probes: list[int] = []

    def probe() -> tuple[str, ...]:
        probes.append(1)
        return ("CPUExecutionProvider",)

    monkeypatch.setattr(hardware, "_probe_providers", probe)
    assert execution_providers(tmp_path) == ("CPUExecutionProvider",)
    assert execution_providers(tmp_path) == ("CPUExecutionProvider",)
    assert len(probes) == 1  # the second answer came from the cache
    cache = tmp_path / PROVIDERS_CACHE
    cache.write_text(json.dumps({"stamp": "onnxruntime==0.0/other", "providers": ["X"]}))
    assert execution_providers(tmp_path) == ("CPUExecutionProvider",)  # stale: probed
    cache.write_text("{not json")
    assert execution_providers(tmp_path) == ("CPUExecutionProvider",)  # corrupt: probed
    assert len(probes) == 3
