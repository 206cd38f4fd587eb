"""Separate hosts on one machine, for fleet tests and benchmarks: one Linux network namespace per host, each
joined by a veth pair to a bridge in the root namespace (ip netns, iproute2; needs root, as here and in CI).

    root namespace: bridge <prefix>br, SUBNET.1/24   (shared services listen here: Kafka, S3)
    host i:         namespace <prefix>h<i>, SUBNET.(10+i)/24, default route via SUBNET.1

Each host has its own address and loopback, so replicas bind the same ports and talk to each other and to the
root namespace's services over real links. cut(i) takes host i's link down (a partition), restore(i) brings it
back. Traffic stays on the machine: the bridge has no uplink.
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess


def netns_available() -> str | None:
    """None when namespaces can be made here; else why not (for a test's skip reason)."""
    if shutil.which("ip") is None:
        return "iproute2's `ip` is not installed (apt-get install iproute2)"
    if os.geteuid() != 0:
        return "network namespaces need root"
    probe = f"ltprobe{os.getpid() % 100000}"
    done = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if done.returncode != 0:
        return f"`ip netns add` failed: {done.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _ip(*args: str, ns: str | None = None) -> None:
    argv = ["ip", *(("netns", "exec", ns, "ip") if ns else ()), *args]
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {done.stderr.strip()}")


_INSTANCES = itertools.count()


class Hosts:
    """`with Hosts(3) as hosts:` — three hosts on a fresh bridge; torn down (processes first) on exit."""

    def __init__(self, n: int, *, prefix: str | None = None, subnet: str | None = None) -> None:
        if not 1 <= n <= 200:
            raise ValueError(f"n must be in 1..200, got {n}")
        # Unique per instance, not only per process: a second Hosts in one process (a test beside a module's
        # fleet) with the same names would tear the first one's namespaces and bridge down in its up().
        tag = (os.getpid() + 997 * next(_INSTANCES)) % 10000
        self.prefix = prefix or f"lt{tag}"  # interface names are at most 15 characters
        if len(self.prefix) > 8:
            raise ValueError(f"prefix must be at most 8 characters (interface names), got {self.prefix!r}")
        self.subnet = subnet or f"10.{77 + tag // 250 % 100}.{tag % 250}"
        self.n = n
        self.bridge = f"{self.prefix}br"
        self.gateway = f"{self.subnet}.1"  # the root namespace's address on the bridge
        self._procs: list[subprocess.Popen] = []

    def namespace(self, i: int) -> str:
        return f"{self.prefix}h{i}"

    def address(self, i: int) -> str:
        return f"{self.subnet}.{10 + i}"

    def _host_end(self, i: int) -> str:
        return f"{self.prefix}v{i}"

    def up(self) -> "Hosts":
        self.down()  # leftovers of a run that died with this prefix
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{self.gateway}/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        for i in range(self.n):
            ns, host_end, ns_end = self.namespace(i), self._host_end(i), f"{self.prefix}n{i}"
            _ip("netns", "add", ns)
            _ip("link", "add", host_end, "type", "veth", "peer", "name", ns_end)
            _ip("link", "set", ns_end, "netns", ns)
            _ip("link", "set", host_end, "master", self.bridge)
            _ip("link", "set", host_end, "up")
            _ip("link", "set", "lo", "up", ns=ns)
            _ip("addr", "add", f"{self.address(i)}/24", "dev", ns_end, ns=ns)
            _ip("link", "set", ns_end, "up", ns=ns)
            _ip("route", "add", "default", "via", self.gateway, ns=ns)
        return self

    def popen(self, i: int, argv: list[str], **kw) -> subprocess.Popen:
        """Start argv inside host i. `ip netns exec` execs it, so the Popen's pid is the program's own."""
        proc = subprocess.Popen(["ip", "netns", "exec", self.namespace(i), *argv], **kw)
        self._procs.append(proc)
        return proc

    def cut(self, i: int) -> None:
        """Host i's link down: it reaches nothing (no broker, no registry) and nothing reaches it."""
        _ip("link", "set", self._host_end(i), "down")

    def restore(self, i: int) -> None:
        _ip("link", "set", self._host_end(i), "up")

    def down(self) -> None:
        for proc in self._procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        self._procs.clear()
        for i in range(self.n):  # deleting a namespace frees its veth pair only asynchronously
            subprocess.run(["ip", "link", "del", self._host_end(i)], capture_output=True)
        listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
        for ns in listed:
            if ns.startswith(f"{self.prefix}h"):
                subprocess.run(["ip", "netns", "del", ns], capture_output=True)  # its veth ends go with it
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)

    def __enter__(self) -> "Hosts":
        return self.up()

    def __exit__(self, *exc) -> None:
        self.down()
