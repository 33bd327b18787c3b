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
    machine = tmp_path / "machine"
    node, other = tmp_path / "node", tmp_path / "other"
    assert execution_providers(node, machine) == ("CPUExecutionProvider",)
    assert execution_providers(node, machine) == ("CPUExecutionProvider",)
    assert execution_providers(other, machine) == ("CPUExecutionProvider",)
    assert len(probes) == 1  # the node's cache, then the machine's, answered
    assert (other / PROVIDERS_CACHE).exists()  # and the new node keeps its own copy
    stale = json.dumps({"stamp": "onnxruntime==0.0/other", "providers": ["X"]})
    for cache in (node / PROVIDERS_CACHE, machine / PROVIDERS_CACHE):
        cache.write_text(stale)
    assert execution_providers(node, machine) == ("CPUExecutionProvider",)  # stale: probed
    for cache in (node / PROVIDERS_CACHE, machine / PROVIDERS_CACHE):
        cache.write_text("{not json")
    assert execution_providers(node, machine) == ("CPUExecutionProvider",)  # corrupt: probed
    assert len(probes) == 3
    assert json.loads((machine / PROVIDERS_CACHE).read_text())["providers"] == list(probe())


def test_an_unwritable_machine_cache_costs_only_the_probe(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(hardware, "_probe_providers", lambda: ("CPUExecutionProvider",))
    blocker = tmp_path / "file"
    blocker.write_text("")  # a file where the machine cache dir would go
    assert execution_providers(tmp_path / "node", blocker / "cache") == ("CPUExecutionProvider",)
    assert (tmp_path / "node" / PROVIDERS_CACHE).exists()


def test_the_machine_cache_dir_follows_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("P2PEDGE_CACHE_DIR", "~/somewhere")
    assert hardware.machine_cache_dir() == Path("~/somewhere").expanduser()
    monkeypatch.delenv("P2PEDGE_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", "/xdg")
    assert hardware.machine_cache_dir() == Path("/xdg/p2pedge")
