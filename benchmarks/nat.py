"""Hole punching through real NATs: success rate, time to direct, relayed vs direct.

Linux network namespaces (as root): a public relay and, per trial, two fresh node
processes, each behind its own nftables NAT that keeps source ports. Each trial dials B
through the relay, measures round trips and throughput on that relayed stream, waits for
DCUtR's direct connection, and measures again on it. Pairs are per trial (relayed is
necessarily measured first: the punch is what creates the direct side). A last trial puts
B behind a NAT that randomises ports: the punch must fail and traffic stay relayed.

Last line: ``punch_success=<f> relay_fallback_ok=<0|1> direct_vs_relayed_rtt=<r> ...``
(the RTT ratio is direct over relayed: below 1 means the direct path is faster).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

from benchmarks._report import (
    headline,
    machine,
    paired_ratio,
    ratio_cell,
    ratio_fields,
    table,
    write_section,
)
from p2pedge.testing.netns import Lab, Proc, unavailable_reason

DRIVER = [sys.executable, "-m", "p2pedge.testing.reach_driver"]
READY_S = 120
ECHO = {"size": 64, "rounds": 20}  # round trips
BULK = {"size": 65_536, "rounds": 16}  # 2 MiB echoed: throughput


def start(lab: Lab, ns: str, *args: str) -> Proc:
    return lab.spawn(ns, [*DRIVER, *args])


def pair(lab: Lab, relay_addr: str, *, random_ports: bool) -> tuple[list[Proc], str, str]:
    homes = [lab.home("a"), lab.home("b", random_ports=random_ports)]
    procs = [
        start(lab, h.host, "--listen", f"/ip4/{h.lan}/tcp/4001", "--reserve", relay_addr, "--punch")
        for h in homes
    ]
    procs[0].expect("ready", READY_S)
    b_id = str(procs[1].expect("ready", READY_S)["peer_id"])
    circuit = procs[1].expect("reserved", 60)["addrs"][0]
    return procs, b_id, circuit


def trial(lab: Lab, relay_addr: str) -> dict[str, float | bool]:
    procs, b_id, circuit = pair(lab, relay_addr, random_ports=False)
    a = procs[0]
    try:
        dialed = time.monotonic()
        a.request("dial", addrs=[circuit])
        relayed = a.request("echo", peer=b_id, **ECHO)
        relayed_bulk = a.request("echo", peer=b_id, **BULK)
        try:
            a.request("wait", peer=b_id, kind="direct", within=60, timeout=70)
        except RuntimeError:
            return {"ok": False}
        to_direct = time.monotonic() - dialed
        direct = a.request("echo", peer=b_id, **ECHO)
        direct_bulk = a.request("echo", peer=b_id, **BULK)
        sides = (relayed["via"], relayed_bulk["via"], direct["via"], direct_bulk["via"])
        return {
            "ok": True,
            "clean": sides == ("relayed", "relayed", "direct", "direct"),
            "to_direct_s": to_direct,
            "relayed_rtt_ms": relayed["rtt_ms"],
            "direct_rtt_ms": direct["rtt_ms"],
            "relayed_mb_s": relayed_bulk["mb_s"],
            "direct_mb_s": direct_bulk["mb_s"],
        }
    finally:
        for proc in procs:
            proc.stop()


def fallback(lab: Lab, relay_addr: str) -> bool:
    procs, b_id, circuit = pair(lab, relay_addr, random_ports=True)
    a = procs[0]
    try:
        a.request("dial", addrs=[circuit])
        punched = a.request("punch", peer=b_id, timeout=120)
        echo = a.request("echo", peer=b_id, **ECHO)
        return not punched["direct"] and echo["via"] == "relayed"
    finally:
        for proc in procs:
            proc.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--no-doc", action="store_true", help="do not update docs/benchmarks.md")
    args = parser.parse_args()
    reason = unavailable_reason()
    if reason is not None:
        print(f"nat benchmark skipped: {reason}")
        print("punch_success=nan relay_fallback_ok=nan direct_vs_relayed_rtt=nan")
        return
    with Lab() as lab:
        relay_ns, relay_ip = lab.public_host("relay")
        relay = start(lab, relay_ns, "--listen", f"/ip4/{relay_ip}/tcp/4001", "--relay",
                      "--relay-bytes", str(64 << 20))  # fmt: skip
        relay_addr = f"/ip4/{relay_ip}/tcp/4001/p2p/{relay.expect('ready', READY_S)['peer_id']}"
        results = []
        for number in range(args.trials):
            results.append(trial(lab, relay_addr))
            print(f"trial {number + 1}: {results[-1]}", flush=True)
        fallback_ok = fallback(lab, relay_addr)
        relay.stop()
    punched = [r for r in results if r["ok"]]
    success = len(punched) / len(results)
    fields = {"punch_success": f"{success:.2f}", "relay_fallback_ok": str(int(fallback_ok))}
    rows = [["hole punch success (port-keeping NATs)", f"{len(punched)}/{len(results)}"]]
    rows.append(["relay fallback (port-randomising NAT)", "ok" if fallback_ok else "FAILED"])
    if punched:
        rtt = paired_ratio(
            [float(r["direct_rtt_ms"]) for r in punched],
            [float(r["relayed_rtt_ms"]) for r in punched],
        )
        speed = paired_ratio(
            [float(r["direct_mb_s"]) for r in punched],
            [float(r["relayed_mb_s"]) for r in punched],
        )
        to_direct = statistics.median(float(r["to_direct_s"]) for r in punched)
        rows += [
            ["time from relayed dial to direct connection (median)", f"{to_direct:.1f} s"],
            [
                "RTT relayed / direct (median, 64 B echo)",
                f"{statistics.median(float(r['relayed_rtt_ms']) for r in punched):.2f} ms / "
                f"{statistics.median(float(r['direct_rtt_ms']) for r in punched):.2f} ms",
            ],
            ["direct vs relayed RTT (relayed measured first each trial)", ratio_cell(rtt)],
            ["direct vs relayed throughput (64 KiB echoes)", ratio_cell(speed)],
            ["every pair on the intended path", str(all(r["clean"] for r in punched))],
        ]
        fields |= ratio_fields("direct_vs_relayed_rtt", rtt)
        fields |= ratio_fields("direct_vs_relayed_mb_s", speed)
        fields["to_direct_s"] = f"{to_direct:.1f}"
    else:
        fields["direct_vs_relayed_rtt"] = "nan"
    body = (
        "## NAT traversal (benchmarks/nat.py)\n\n"
        f"{machine()}. Namespaces with nftables masquerade; node processes over TCP; "
        "the relay is a p2pedge node with `--relay`.\n\n" + table(["measure", "value"], rows)
    )
    print(body)
    if not args.no_doc:
        write_section("nat", body)
    print(headline(fields))


if __name__ == "__main__":
    main()
