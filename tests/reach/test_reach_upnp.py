"""UPnP against a real gateway: miniupnpd (nftables backend) on a router namespace.

A home host asks the router for a port mapping through :func:`p2pedge.reach.upnp.map_port`
(SSDP discovery, SOAP), gets the router's public address, and a host on the public side
reaches the home host's listener through that address; once the home host removes the
mapping, the router forwards nothing. Needs root, nftables and miniupnpd (``make
netns-tools``); skipped with the reason elsewhere.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from p2pedge.testing.netns import LineReader, unavailable_reason

WAN, LAN = "45.76.0", "192.168.78"  # a public-looking segment: it exists only in the namespaces
MINIUPNPD = "/usr/sbin/miniupnpd"
RULES = """table inet filter {
  chain forward { type filter hook forward priority 0; policy drop;
    ct state established,related accept; iifname "lan0" accept; jump miniupnpd; }
  chain miniupnpd { }
  chain prerouting { type nat hook prerouting priority -100; policy accept;
    jump prerouting_miniupnpd; }
  chain postrouting { type nat hook postrouting priority 100; policy accept;
    oifname "wan0" masquerade; jump postrouting_miniupnpd; }
  chain prerouting_miniupnpd { }
  chain postrouting_miniupnpd { }
}
"""
HOME = """
import json, socket, sys, trio
from p2pedge.reach.upnp import keep_mapped

def report(mapping):
    print(json.dumps(mapping and [mapping.external_ip, mapping.external_port]), flush=True)

async def main():
    listener = socket.create_server(("0.0.0.0", 4001))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(keep_mapped, 4001, report)
        conn, _ = await trio.to_thread.run_sync(listener.accept)
        conn.sendall(b"home")
        conn.close()
        await trio.to_thread.run_sync(sys.stdin.readline)
        nursery.cancel_scope.cancel()  # keep_mapped removes the mapping on its way out
    print(json.dumps("unmapped"), flush=True)

trio.run(main)
"""


def sh(*args: str) -> str:
    return subprocess.run(args, check=True, capture_output=True, text=True, timeout=30).stdout


@dataclass
class Gateway:
    router: str
    home: str
    public: str


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[Gateway]:
    reason = unavailable_reason()
    if reason is None and not os.access(MINIUPNPD, os.X_OK):
        reason = "miniupnpd is not installed (make netns-tools installs miniupnpd-nftables)"
    if reason is not None:
        pytest.skip(reason)
    tag = f"p2pe-upnp-{os.getpid()}"
    names = Gateway(f"{tag}-r", f"{tag}-h", f"{tag}-p")
    daemon = None
    try:
        for ns in (names.router, names.home, names.public):
            sh("ip", "netns", "add", ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        for here, there, peer_ns, net in (
            ("wan0", "wan1", names.public, WAN),
            ("lan0", "lan1", names.home, LAN),
        ):
            sh("ip", "link", "add", here, "netns", names.router, "type", "veth", "peer", "name",
               there, "netns", peer_ns)  # fmt: skip
            sh("ip", "-n", names.router, "addr", "add", f"{net}.1/24", "dev", here)
            sh("ip", "-n", peer_ns, "addr", "add", f"{net}.2/24", "dev", there)
            sh("ip", "-n", names.router, "link", "set", here, "up")
            sh("ip", "-n", peer_ns, "link", "set", there, "up")
        sh("ip", "-n", names.home, "route", "add", "default", "via", f"{LAN}.1")
        sh("ip", "netns", "exec", names.router, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        (tmp_path / "rules.nft").write_text(RULES)
        sh("ip", "netns", "exec", names.router, "nft", "-f", str(tmp_path / "rules.nft"))
        conf = tmp_path / "miniupnpd.conf"
        conf.write_text(
            "ext_ifname=wan0\nlistening_ip=lan0\nenable_upnp=yes\nenable_natpmp=no\n"
            "secure_mode=yes\nsystem_uptime=yes\nuuid=3c8e3b10-5a4e-4d8a-9a53-6f1e2d7c9b01\n"
            f"allow 1024-65535 {LAN}.0/24 1024-65535\ndeny 0-65535 0.0.0.0/0 0-65535\n"
        )
        daemon = subprocess.Popen(
            ["ip", "netns", "exec", names.router, MINIUPNPD, "-d", "-f", str(conf)],
            stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert daemon.stderr is not None
        log = LineReader(daemon.stderr)
        while "HTTP listening" not in (log.next(timeout=20) or "HTTP listening"):
            pass  # ready once it listens for SOAP requests (or it exited: the test says)
        yield names
    finally:
        if daemon is not None:
            daemon.terminate()
            daemon.wait(timeout=10)
        for ns in (names.router, names.home, names.public):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)


def forwarded(router: str) -> str:
    return sh("ip", "netns", "exec", router, "nft", "list", "chain", "inet", "filter",
              "prerouting_miniupnpd")  # fmt: skip


def test_a_home_host_maps_its_port_and_is_reached_at_the_routers_public_address(
    gateway: Gateway,
) -> None:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    home = subprocess.Popen(
        ["ip", "netns", "exec", gateway.home, sys.executable, "-c", HOME],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    assert home.stdin is not None and home.stdout is not None
    lines = LineReader(home.stdout)
    try:
        mapped = json.loads(lines.next(timeout=30) or "null")
        assert mapped == [f"{WAN}.1", 4001]
        assert f"dnat ip to {LAN}.2:4001" in forwarded(gateway.router)
        dial = "import socket; print(socket.create_connection(('%s', 4001), 5).recv(4).decode())"
        reached = sh("ip", "netns", "exec", gateway.public, sys.executable, "-c",
                     dial % mapped[0])  # fmt: skip
        assert reached.strip() == "home"
        home.stdin.write("\n")
        home.stdin.flush()
        assert json.loads(lines.next(timeout=30) or "null") == "unmapped"
        assert "dnat" not in forwarded(gateway.router)
    finally:
        home.kill()
        home.wait(timeout=10)


def test_a_gateways_external_address_is_announced_only_when_public() -> None:
    from p2pedge.errors import PeerUnavailable, RemoteProtocolError
    from p2pedge.reach.upnp import Mapping, _check_external, lan_tcp_port

    assert _check_external("45.76.0.1") == "45.76.0.1"
    for behind_another_nat in ("192.168.1.1", "10.0.0.1", "127.0.0.1", "0.0.0.0"):
        with pytest.raises(PeerUnavailable):
            _check_external(behind_another_nat)
    for nonsense in ("", "example.com", None, "1.2.3.4/24"):
        with pytest.raises(RemoteProtocolError):
            _check_external(nonsense)
    mapping = Mapping("45.76.0.1", 4001, 4001, "TCP")
    assert mapping.multiaddr("P") == "/ip4/45.76.0.1/tcp/4001/p2p/P"
    listen = ["/ip4/127.0.0.1/tcp/1/p2p/P", "/ip4/192.168.1.5/udp/2/quic-v1", "/ip4/0.0.0.0/tcp/3"]
    assert lan_tcp_port(listen) == 3 and lan_tcp_port(listen[:2]) is None


def test_a_node_with_upnp_announces_the_mapped_address_and_peers_join_through_it(
    gateway: Gateway, tmp_path: Path
) -> None:
    """``Reach(upnp=True)`` (``--upnp``) wired into a real node: the router forwards its
    listen port, a peer on the public side bootstraps through the router's address, and
    the card it reads lists that address."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    node = [sys.executable, "-m", "p2pedge.node"]
    home = subprocess.Popen(
        ["ip", "netns", "exec", gateway.home, *node, "run", "--json", "--upnp",
         "--listen", "/ip4/0.0.0.0/tcp/4001", "--data-dir", str(tmp_path / "home")],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env,
    )  # fmt: skip
    assert home.stdout is not None
    lines = LineReader(home.stdout)
    try:
        event: dict[str, object] = {}
        while event.get("event") != "listening":
            event = json.loads(lines.next(timeout=60) or '{"event": "exited"}')
            assert event["event"] != "exited", "the home node exited"
        peer = str(event["peer_id"])
        public = f"/ip4/{WAN}.1/tcp/4001/p2p/{peer}"
        listed: list[str] = []
        for _ in range(10):  # the mapping and its re-announce come after "listening"
            out = subprocess.run(
                ["ip", "netns", "exec", gateway.public, *node, "peers", "--json",
                 "--bootstrap", public, "--data-dir", str(tmp_path / "public")],
                capture_output=True, text=True, timeout=60, env=env,
            )  # fmt: skip
            cards = [json.loads(x)["card"] for x in out.stdout.splitlines() if '"peer"' in x]
            listed = [a for c in cards if c["peer_id"] == peer for a in c["addrs"]]
            if public in listed:
                break
        assert public in listed, (listed, out.stderr[-2000:])
        assert f"dnat ip to {LAN}.2:4001" in forwarded(gateway.router)
    finally:
        home.terminate()
        home.wait(timeout=30)
    assert "dnat" not in forwarded(gateway.router)  # the node removed its mapping on exit


class FaultyGateway:
    """Fault injection: a gateway that maps the port, then describes the mapping as
    ``held`` (a router's answer is whatever it sends)."""

    def __init__(self, held: object) -> None:
        self.held, self.lanaddr, self.discoverdelay = held, "192.168.1.2", 0

    def discover(self) -> int:
        return 1

    def selectigd(self) -> None:
        pass

    def externalipaddress(self) -> str:
        return "45.76.0.1"

    def addportmapping(self, *args: object) -> bool:
        return True

    def getspecificportmapping(self, port: int, protocol: str) -> object:
        return self.held


@pytest.mark.parametrize("held", [(), ("192.168.1.2",), 7, ("192.168.1.9", 4001, "x")])
def test_a_malformed_or_foreign_mapping_reply_is_the_gateways_fault(
    held: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    from p2pedge.errors import RemoteProtocolError
    from p2pedge.reach import upnp

    monkeypatch.setattr(upnp, "_gateway", lambda: FaultyGateway(held))
    with pytest.raises(RemoteProtocolError, match="another mapping"):
        upnp.map_port(4001)
    monkeypatch.setattr(upnp, "_gateway", lambda: FaultyGateway(("192.168.1.2", 4001, "")))
    assert upnp.map_port(4001).external_ip == "45.76.0.1"
