"""Linux network namespaces as a small internet: a public segment, home NATs, processes.

A :class:`Lab` builds, as root, an ``inet`` namespace holding a bridge (the public
internet, 10.77.0.0/24), public hosts on it, and homes: a router namespace that
masquerades its LAN (192.168.<n>.0/24) behind its public address with nftables, and a
host namespace behind it. Every name carries a per-run tag with the creating process id,
so a crashed run's leftovers are recognised and removed by the next (:func:`sweep_stale`);
:meth:`Lab.close` removes everything even after a failure. Addresses exist only inside
the namespaces; the machine's own network is never touched.

Processes inside a namespace are driven over stdout JSON lines (:class:`LineReader`),
read with deadlines: no sleeps as synchronisation.
"""

from __future__ import annotations

import json
import os
import queue
import secrets
import shutil
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import IO, Any

PREFIX = "p2pe"  # every namespace this module creates starts with it
PUBLIC_NET = "10.77.0"


class NetnsUnavailable(RuntimeError):
    """This machine cannot create namespaces or NAT (the reason is the message)."""


def _run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(args, check=False, capture_output=True, text=True, timeout=30)
    if check and done.returncode != 0:
        raise NetnsUnavailable(f"{' '.join(args)}: {done.stderr.strip()}")
    return done


def unavailable_reason() -> str | None:
    """Why namespace tests cannot run here, or None when they can."""
    if os.geteuid() != 0:
        return "network namespaces need root (CAP_NET_ADMIN)"
    for tool in ("ip", "nft"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed (make netns-tools installs nftables)"
    probe = f"{PREFIX}-probe-{os.getpid()}"
    made = _run("ip", "netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"cannot create a network namespace: {made.stderr.strip()}"
    try:
        nat = _run("ip", "netns", "exec", probe, "nft", "add", "table", "ip", "probe", check=False)
        if nat.returncode != 0:
            return f"nftables does not work in a namespace: {nat.stderr.strip()}"
    finally:
        _run("ip", "netns", "del", probe, check=False)
    return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale() -> list[str]:
    """Delete namespaces left by runs whose process has died; returns their names."""
    listed = _run("ip", "netns", "list", check=False).stdout.split("\n")
    removed = []
    for line in listed:
        name = line.split(" ")[0]
        parts = name.split("-")
        if len(parts) < 3 or parts[0] != PREFIX or not parts[1].isdigit():
            continue
        if not _pid_alive(int(parts[1])):
            _run("ip", "netns", "del", name, check=False)
            removed.append(name)
    return removed


@dataclass
class Home:
    """A host behind its own NAT router; ``wan`` is the router's public address."""

    router: str
    host: str
    wan: str
    lan: str


@dataclass
class Lab:
    """A throwaway topology; use as a context manager so it is always removed."""

    tag: str = field(default_factory=lambda: f"{PREFIX}-{os.getpid()}-{secrets.token_hex(2)}")
    namespaces: list[str] = field(default_factory=list)
    _next_public: int = 1
    _next_home: int = 1

    def __enter__(self) -> Lab:
        sweep_stale()
        self.inet = self._namespace("inet")
        self.ip(self.inet, "link", "add", "br0", "type", "bridge")
        self.ip(self.inet, "link", "set", "br0", "up")
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for name in reversed(self.namespaces):
            # killing the namespace's processes first lets `ip netns del` free it at once
            pids = _run("ip", "netns", "pids", name, check=False).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), 9)
                except (ProcessLookupError, ValueError):
                    continue
            _run("ip", "netns", "del", name, check=False)
        self.namespaces.clear()

    # -- building --------------------------------------------------------------------

    def _namespace(self, role: str) -> str:
        name = f"{self.tag}-{role}"
        if name in self.namespaces:  # a second home with the same role
            name = f"{name}{len(self.namespaces)}"
        _run("ip", "netns", "add", name)
        self.namespaces.append(name)
        self.ip(name, "link", "set", "lo", "up")
        return name

    def ip(self, ns: str, *args: str) -> None:
        _run("ip", "-n", ns, *args)

    def sh(self, ns: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run a command inside ``ns`` and wait for it."""
        return _run("ip", "netns", "exec", ns, *args, check=check)

    def _uplink(self, ns: str, ifname: str) -> str:
        """A veth from ``ns`` into the public bridge; returns its public address."""
        index = self._next_public
        self._next_public += 1
        port = f"p{index}"
        self.ip(ns, "link", "add", ifname, "type", "veth", "peer", "name", port, "netns", self.inet)
        self.ip(self.inet, "link", "set", port, "master", "br0")
        self.ip(self.inet, "link", "set", port, "up")
        addr = f"{PUBLIC_NET}.{index}"
        self.ip(ns, "addr", "add", f"{addr}/24", "dev", ifname)
        self.ip(ns, "link", "set", ifname, "up")
        return addr

    def public_host(self, role: str) -> tuple[str, str]:
        """A namespace with a public address; returns (namespace, address)."""
        ns = self._namespace(role)
        return ns, self._uplink(ns, "eth0")

    def home(self, role: str, *, random_ports: bool = False) -> Home:
        """A host behind a masquerading router.

        ``random_ports`` maps every flow to a random source port (a symmetric NAT, which
        defeats hole punching); without it nftables keeps the source port where it is
        free, so a mapping does not depend on the destination.
        """
        number = self._next_home
        self._next_home += 1
        router = self._namespace(f"{role}r")
        host = self._namespace(role)
        wan = self._uplink(router, "wan0")
        lan_net = f"192.168.{number}"
        self.ip(
            router, "link", "add", "lan0", "type", "veth", "peer", "name", "eth0", "netns", host
        )
        self.ip(router, "addr", "add", f"{lan_net}.1/24", "dev", "lan0")
        self.ip(router, "link", "set", "lan0", "up")
        self.ip(host, "addr", "add", f"{lan_net}.2/24", "dev", "eth0")
        self.ip(host, "link", "set", "eth0", "up")
        self.ip(host, "route", "add", "default", "via", f"{lan_net}.1")
        self.sh(router, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        flags = " random,fully-random" if random_ports else ""
        rules = (
            "table ip nat {\n"
            " chain post { type nat hook postrouting priority srcnat; policy accept;\n"
            f'  oifname "wan0" ip saddr {lan_net}.0/24 masquerade{flags}\n'
            " }\n"
            "}\n"
            "table ip filter {\n"
            " chain forward_lan { type filter hook forward priority filter; policy drop;\n"
            "  ct state established,related accept\n"
            '  iifname "lan0" oifname "wan0" accept\n'
            " }\n"
            # a home router drops what nobody inside asked for, silently: a reset would
            # tell the far side's NAT to forget the mapping a hole punch is opening
            " chain input_wan { type filter hook input priority filter; policy accept;\n"
            '  iifname "wan0" ct state established,related accept\n'
            '  iifname "wan0" drop\n'
            " }\n"
            "}\n"
        )
        done = subprocess.run(
            ["ip", "netns", "exec", router, "nft", "-f", "-"],
            input=rules,
            capture_output=True,
            text=True,
            timeout=30,
        )
        if done.returncode != 0:
            raise NetnsUnavailable(f"nft in {router}: {done.stderr.strip()}")
        return Home(router=router, host=host, wan=wan, lan=f"{lan_net}.2")

    def lan_host(self, bridge_ns: str, role: str, number: int, lan_net: str) -> tuple[str, str]:
        """A host on a bridge ``br0`` in ``bridge_ns`` (one LAN segment, e.g. for mDNS)."""
        ns = self._namespace(role)
        port = f"l{number}"
        self.ip(ns, "link", "add", "eth0", "type", "veth", "peer", "name", port, "netns", bridge_ns)
        self.ip(bridge_ns, "link", "set", port, "master", "br0")
        self.ip(bridge_ns, "link", "set", port, "up")
        addr = f"{lan_net}.{number}"
        self.ip(ns, "addr", "add", f"{addr}/24", "dev", "eth0")
        self.ip(ns, "link", "set", "eth0", "up")
        self.ip(ns, "route", "add", "224.0.0.0/4", "dev", "eth0")  # mDNS, with no default route
        return ns, addr

    def lan(self, role: str) -> str:
        """A namespace holding a bare bridge ``br0`` (a switch); see :meth:`lan_host`."""
        ns = self._namespace(role)
        self.ip(ns, "link", "add", "br0", "type", "bridge")
        self.ip(ns, "link", "set", "br0", "up")
        return ns

    # -- processes -------------------------------------------------------------------

    def spawn(self, ns: str, argv: Sequence[str], *, env: dict[str, str] | None = None) -> Proc:
        """Start ``argv`` inside ``ns`` with piped stdin/stdout (JSON lines)."""
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        popen = subprocess.Popen(
            ["ip", "netns", "exec", ns, *argv],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=full_env,
        )
        return Proc(popen)


class LineReader:
    """Lines of a pipe, read by a thread, taken with a deadline."""

    def __init__(self, pipe: IO[str]) -> None:
        self._lines: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        thread = threading.Thread(target=self._pump, args=(pipe,), daemon=True)
        thread.start()

    def _pump(self, pipe: IO[str]) -> None:
        for line in pipe:
            self._lines.put(line)
        self._lines.put(None)

    def next(self, timeout: float) -> str | None:
        """The next line, None at end of stream; TimeoutError past the deadline."""
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"no line within {timeout:g} s") from None
        if line is not None:
            self.seen.append(line)
        return line


class Proc:
    """A process speaking JSON lines: requests on stdin, replies and events on stdout."""

    def __init__(self, popen: subprocess.Popen[str]) -> None:
        self.popen = popen
        assert popen.stdout is not None and popen.stderr is not None
        self.out = LineReader(popen.stdout)
        self.err = LineReader(popen.stderr)

    def expect(self, event: str, timeout: float = 30.0) -> dict[str, Any]:
        """Wait for a JSON line whose ``event`` is ``event``; fail on an ``error`` one."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no {event!r} within {timeout:g} s; {self.stderr_tail()}")
            try:
                line = self.out.next(left)
            except TimeoutError:
                raise TimeoutError(
                    f"no {event!r} within {timeout:g} s; {self.stderr_tail()}"
                ) from None
            if line is None:
                raise RuntimeError(f"process ended before {event!r}; {self.stderr_tail()}")
            try:
                message = json.loads(line)
            except ValueError:
                continue  # a stray print, not ours
            if not isinstance(message, dict):
                continue
            if message.get("event") == event:
                return message
            if message.get("event") == "error":
                raise RuntimeError(f"{event!r} failed: {message.get('error')}")

    def request(self, op: str, timeout: float = 30.0, **fields: Any) -> dict[str, Any]:
        """Send one request and wait for its reply (``event`` == ``op``)."""
        assert self.popen.stdin is not None
        self.popen.stdin.write(json.dumps({"op": op, **fields}) + "\n")
        self.popen.stdin.flush()
        return self.expect(op, timeout)

    def stderr_tail(self, lines: int = 15) -> str:
        # drain what the reader thread has without waiting
        while True:
            try:
                if self.err.next(0.01) is None:
                    break
            except TimeoutError:
                break
        return "stderr: " + "".join(self.err.seen[-lines:])

    def stop(self, timeout: float = 10.0) -> int:
        """Close stdin (the driver exits cleanly) and wait; kill past the deadline."""
        if self.popen.poll() is None:
            try:
                assert self.popen.stdin is not None
                self.popen.stdin.close()
            except BrokenPipeError:
                pass
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout)
        return self.popen.returncode
