"""mDNS on one LAN segment: node processes in two namespaces find and connect each other.

py-libp2p's mDNS only fills the peerstore; :func:`p2pedge.reach.mdns.dial_discovered`
dials what it reports. No bootstrap address is given to either node.
"""

from __future__ import annotations

import sys

import pytest

from p2pedge.testing.netns import Lab

pytestmark = pytest.mark.slow
DRIVER = [sys.executable, "-m", "p2pedge.testing.reach_driver"]


def test_mdns_discovers_and_connects_peers_on_one_bridge(lab: Lab) -> None:
    switch = lab.lan("switch")
    procs = []
    try:
        for number in (1, 2):
            ns, ip = lab.lan_host(switch, f"m{number}", number, "192.168.50")
            procs.append(lab.spawn(ns, [*DRIVER, "--listen", f"/ip4/{ip}/tcp/4001", "--mdns"]))
        ids = [str(p.expect("ready", 90)["peer_id"]) for p in procs]
        found = procs[0].expect("mdns", 60)["peer"]
        assert found == ids[1]
        assert procs[1].expect("mdns", 60)["peer"] == ids[0]
        # both may dial at once (two connections); either carries a p2pedge stream
        kinds = procs[0].request("kinds", peer=ids[1])["kinds"]
        assert kinds and set(kinds) == {"direct"}
        assert set(procs[0].request("echo", peer=ids[1], size=256)["kinds"]) == {"direct"}
    finally:
        codes = [p.stop() for p in procs]
    assert codes == [0, 0], [p.stderr_tail() for p in procs]
