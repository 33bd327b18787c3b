"""Real processes: `python -m p2pedge.node` joins, lists peers, and exits cleanly on signals."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import trio

pytestmark = pytest.mark.slow
NODE = [sys.executable, "-m", "p2pedge.node"]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


async def start_node(
    tmp_path: Path, name: str, *extra: str
) -> tuple[trio.Process, dict[str, object]]:
    proc = await trio.lowlevel.open_process(
        [*NODE, "--data-dir", str(tmp_path / name), "--json", *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=ENV,
    )
    assert proc.stdout is not None
    buffer = b""
    with trio.fail_after(60):
        while b"\n" not in buffer:
            chunk = await proc.stdout.receive_some(4096)
            assert chunk, "node exited before printing its addresses"
            buffer += chunk
    return proc, json.loads(buffer.split(b"\n", 1)[0])


async def stop(proc: trio.Process, sig: int = signal.SIGINT) -> tuple[int, bytes]:
    proc.send_signal(sig)
    start = trio.current_time()
    with trio.fail_after(10):
        code = await proc.wait()
    elapsed = trio.current_time() - start
    assert proc.stderr is not None
    err = await proc.stderr.receive_some(1 << 16)
    assert elapsed < 2.5, f"shutdown took {elapsed:.2f} s"
    return code, err or b""


async def test_two_processes_bootstrap_list_peers_and_exit_cleanly(tmp_path: Path) -> None:
    first, hello = await start_node(tmp_path, "first")
    assert hello["event"] == "listening"
    addr = hello["addrs"][0]  # type: ignore[index]
    assert str(addr).endswith(f"/p2p/{hello['peer_id']}")
    second, hello2 = await start_node(tmp_path, "second", "--bootstrap", str(addr))
    try:
        result = await trio.run_process(
            [*NODE, "peers", "--bootstrap", str(addr), "--json"],
            capture_stdout=True,
            capture_stderr=True,
            env=ENV,
        )
        events = [json.loads(line) for line in result.stdout.decode().splitlines()]
        listed = {e["card"]["peer_id"] for e in events if e["event"] == "peer"}
        assert listed == {hello["peer_id"], hello2["peer_id"]}
        assert events[-1] == {"event": "done", "count": 2}
    finally:
        code2, err2 = await stop(second, signal.SIGTERM)
        code1, err1 = await stop(first, signal.SIGINT)
    assert (code1, code2) == (0, 0)
    assert b"Traceback" not in err1 + err2


@pytest.mark.parametrize(
    "args, message",
    [
        (["peers", "--bootstrap", "/ip4/not-an-ip/tcp/1"], b"not a multiaddr"),
        (["--psk-file", "/nonexistent/swarm.key"], b"cannot read PSK file"),
    ],
)
async def test_bad_input_gives_one_line_and_exit_2(args: list[str], message: bytes) -> None:
    result = await trio.run_process(
        [*NODE, *args], capture_stdout=True, capture_stderr=True, check=False, env=ENV
    )
    assert result.returncode == 2
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_lane_flags_reach_the_node_config(tmp_path: Path) -> None:
    from p2pedge.node.cli import _config, build_parser

    base = ["run", "--data-dir", str(tmp_path)]
    default = _config(build_parser().parse_args(base))
    assert default.direct_lane == 0  # on, the OS picks the port
    port = _config(build_parser().parse_args([*base, "--lane-port", "4002"]))
    assert port.direct_lane == 4002
    chosen = _config(build_parser().parse_args([*base, "--lane-port", "4002", "--no-direct-lane"]))
    assert chosen.direct_lane is None  # off wins over a port


def test_shard_source_flags_reach_the_node_config(tmp_path: Path) -> None:
    from p2pedge.ids import LayerRange
    from p2pedge.node.cli import _config, build_parser

    base = ["run", "--data-dir", str(tmp_path)]
    default = _config(build_parser().parse_args(base))
    assert default.registry is None and default.trusted_publishers == ()
    args = [*base, "--serve", "tiny@2:3-6", "--registry", "http://127.0.0.1:8080"]
    args += ["--trust", "a.pub", "--trust", "keys"]
    chosen = _config(build_parser().parse_args(args))
    assert chosen.registry == "http://127.0.0.1:8080"
    assert chosen.trusted_publishers == (Path("a.pub"), Path("keys"))
    assert [(s.model, s.layers) for s in chosen.serve] == [("tiny@2", LayerRange(3, 6))]


def test_inline_step_flag_reaches_the_node_config_and_is_checked(tmp_path: Path) -> None:
    from p2pedge.errors import ConfigError
    from p2pedge.node.cli import _config, build_parser
    from p2pedge.node.config import Tuning
    from p2pedge.runtime.config import RuntimeConfig

    base = ["run", "--data-dir", str(tmp_path)]
    assert _config(build_parser().parse_args(base)).tuning.inline_step_ms == 50.0
    off = _config(build_parser().parse_args([*base, "--inline-step-ms", "0"]))
    assert off.tuning.inline_step_ms == 0.0
    with pytest.raises(ConfigError, match="inline_step_ms"):
        Tuning(inline_step_ms=-1)
    with pytest.raises(ConfigError, match="inline_step_s"):
        RuntimeConfig(inline_step_s=-0.001)


def test_inline_step_reaches_local_generation(tmp_path: Path) -> None:
    from p2pedge.node.config import NodeConfig, Tuning
    from p2pedge.node.node import Node

    for ms in (0.0, 80.0):
        node = Node(
            NodeConfig(data_dir=tmp_path, local_only=True, tuning=Tuning(inline_step_ms=ms))
        )
        assert node.models.inference.costs.inline_budget_s == ms / 1000
        node.models.inference.close()
