"""Peers behind their own masquerading NATs, a public relay, and real node processes.

Each NATed peer reserves a slot on the relay and puts its ``/p2p-circuit`` address in its
signed card. The client finds the server on the relay's DHT and reaches it through the
relay (its stream opening dials the circuit); it pulls the model the server published
(every chunk verified) and runs a sharded generation whose tokens equal local ones. The
server's direct lane sits on a LAN address nobody outside can dial, so shard traffic
falls back to libp2p streams. With DCUtR on both sides and NATs that keep source ports
the relayed connection is upgraded to a direct one; behind a NAT that randomises ports
the punch fails and traffic stays on the relay, within its byte limit.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from p2pedge.models.keys import generate_key, save_private_key
from p2pedge.testing import build_tiny_model
from p2pedge.testing.netns import Lab, Proc

pytestmark = pytest.mark.slow
Start = Callable[..., Proc]
READY_S = 90  # node processes start in parallel on a shared 2-core machine


@dataclass
class Pair:
    client: Proc
    server: Proc
    server_id: str
    circuit: str  # the server's address through the relay
    relay_id: str


def natted_pair(
    lab: Lab, start_node: Start, *flags: str, random_ports: bool = False, relay_bytes: int = 0
) -> Pair:
    """A public relay and two NATed peers that reserved a slot on it."""
    relay_ns, relay_ip = lab.public_host("relay")
    homes = lab.home("client"), lab.home("server", random_ports=random_ports)
    limit = ("--relay-bytes", str(relay_bytes)) if relay_bytes else ()
    relay = start_node(relay_ns, "--listen", f"/ip4/{relay_ip}/tcp/4001", "--relay", *limit)
    relay_id = str(relay.expect("ready", READY_S)["peer_id"])
    relay_addr = f"/ip4/{relay_ip}/tcp/4001/p2p/{relay_id}"
    client, server = (
        start_node(
            home.host,
            *("--listen", f"/ip4/{home.lan}/tcp/4001"),
            *("--bootstrap", relay_addr, "--reserve", relay_addr, *flags),
        )
        for home in homes
    )
    client.expect("ready", READY_S)
    server_id = str(server.expect("ready", READY_S)["peer_id"])
    reserved = server.expect("reserved", 60)["addrs"]
    assert reserved == [f"{relay_addr}/p2p-circuit/p2p/{server_id}"]
    return Pair(client, server, server_id, reserved[0], relay_id)


def model_flags(tmp_path: Path) -> tuple[Path, Path, list[str]]:
    """A tiny model both peers hold (the client to compare), a publisher key, and flags."""
    model = build_tiny_model(tmp_path / "tiny")
    key = tmp_path / "publisher.key"
    save_private_key(generate_key(), key)
    return model, key, ["--model", f"tiny={model}", "--trust", f"{key}.pub"]


def pull_and_generate(pair: Pair, model: Path, key: Path) -> None:
    """The client pulls the server's published model and generates through its shard."""
    publish = {"dir": str(model), "model": "tiny@1", "key": str(key)}
    assert pair.server.request("publish", timeout=90, **publish)["files"]
    pulled = Path(pair.client.request("pull", model="tiny@1", timeout=120)["dir"])
    for name in ("model.onnx", "model.onnx.block-003.data", "tokenizer.json"):
        assert (pulled / name).read_bytes() == (model / name).read_bytes()
    prompt = {"model": "tiny", "prompt": "hello there", "n": 6}
    local = pair.client.request("complete", route="local", **prompt)["tokens"]
    sharded = pair.client.request("complete", route="sharded", timeout=120, **prompt)["tokens"]
    assert sharded == local and len(local) == 6


def test_relay_connection_carries_a_pull_and_a_sharded_generation(
    lab: Lab, start_node: Start, tmp_path: Path
) -> None:
    public_ns, public_ip = lab.public_host("public")  # a peer with its own public address
    public = start_node(public_ns, "--listen", f"/ip4/{public_ip}/tcp/4001")
    model, key, flags = model_flags(tmp_path)
    pair = natted_pair(lab, start_node, *flags, "--serve", "tiny:0-4", relay_bytes=8_000_000)
    client, server_id = pair.client, pair.server_id
    # AutoNAT: the relay dials each back on a fresh connection, at the address it sees
    public.expect("ready", READY_S)
    relay_addr = pair.circuit.split("/p2p-circuit")[0]
    assert public.request("connect", addr=relay_addr)["peer"] == pair.relay_id
    assert public.request("reach", servers=[pair.relay_id])["reachability"] == "public"
    assert client.request("reach", servers=[pair.relay_id])["reachability"] == "private"
    # discovery: the server's signed card on the relay's DHT names its circuit address
    assert server_id in client.request("lookup")["known"]
    assert pair.circuit in client.request("card", peer=server_id)["addrs"]
    assert client.request("kinds", peer=server_id)["kinds"] == []
    # no explicit dial: opening a stream dials through the relay (the LAN address fails)
    echo = client.request("echo", peer=server_id, size=4096)
    assert echo["via"] == "relayed" and echo["kinds"] == ["relayed"]
    pull_and_generate(pair, model, key)
    assert client.request("kinds", peer=server_id)["kinds"] == ["relayed"]
    # the server's lane listens on its LAN address: over the relay the client's lane dials
    # to it fail and its blob and pipeline streams fell back to libp2p (through the relay);
    # only the client's own shard (it serves blocks too) may take a lane, its own
    lanes = client.request("lanes")
    assert not {server_id, pair.relay_id} & set(lanes["opened"]), lanes
    assert lanes["fallbacks"] >= 1, lanes


def test_hole_punch_upgrades_to_a_direct_connection(
    lab: Lab, start_node: Start, tmp_path: Path
) -> None:
    model, key, flags = model_flags(tmp_path)
    pair = natted_pair(lab, start_node, "--punch", *flags, "--serve", "tiny:0-4")
    client, server_id = pair.client, pair.server_id
    assert client.request("dial", addrs=[pair.circuit])["peer"] == server_id
    # DCUtR starts by itself on a relayed connection; wait for the direct one it opens
    direct = client.request("wait", peer=server_id, kind="direct", within=60, timeout=65)
    assert "direct" in direct["kinds"]
    # new streams take the direct connection (py-libp2p prefers it over a relayed one)
    assert client.request("echo", peer=server_id, size=64, rounds=5)["via"] == "direct"
    pull_and_generate(pair, model, key)  # on the direct connection


def test_random_port_nat_falls_back_to_the_relay_within_its_limits(
    lab: Lab, start_node: Start
) -> None:
    pair = natted_pair(lab, start_node, "--punch", random_ports=True, relay_bytes=200_000)
    client, server_id = pair.client, pair.server_id
    assert client.request("dial", addrs=[pair.circuit])["peer"] == server_id
    assert client.request("punch", peer=server_id, timeout=90) == {
        "event": "punch",
        "direct": False,
        "kinds": ["relayed"],
    }
    assert client.request("echo", peer=server_id, size=16_384, rounds=2)["via"] == "relayed"
    # 2 x 2 x 64 KiB more is past the relay's 200 kB per circuit: it resets the circuit
    with pytest.raises(RuntimeError, match="failed"):
        client.request("echo", peer=server_id, size=65_536, rounds=2)
    closed = client.request("wait", peer=server_id, kind="relayed", open=False, within=30)
    assert closed["kinds"] == []
    # a fresh circuit carries traffic again
    assert client.request("dial", addrs=[pair.circuit])["peer"] == server_id
    assert client.request("echo", peer=server_id, size=1024)["via"] == "relayed"
