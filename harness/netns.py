"""A real network link between two emulated hosts: two network namespaces joined by a
veth pair, shaped by `tc tbf`. Used by `make e2e-netns` and by the benchmark.

Needs root and the `ip` and `tc` commands (iproute2); `unavailable()` says why not.
Names carry the pid and a counter, so several links (and several runs) coexist;
`close()` deletes both namespaces, which removes the veth pair and its qdisc.
"""
from __future__ import annotations

import itertools
import os
import shutil
import subprocess
from typing import Any

IP_A, IP_B = "10.199.0.1", "10.199.0.2"
_serial = itertools.count()


def sh(*argv: str, check: bool = True, **kw: Any) -> subprocess.CompletedProcess:
    kw.setdefault("text", True)
    return subprocess.run(argv, check=check, capture_output=True, **kw)


def unavailable() -> str | None:
    """Why a NetnsLink cannot be made here, or None when it can."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, veth, tc)"
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    if missing:
        return f"needs {' and '.join(missing)} (Debian package iproute2)"
    return None


class NetnsLink:
    """Namespaces `ns_a` and `ns_b`, veth `dev_a` (IP_A) <-> `dev_b` (IP_B); shaping on A's egress."""

    kind = "tc tbf on a veth pair between two network namespaces"

    def __init__(self, tag: str = "xm") -> None:
        n = f"{os.getpid()}x{next(_serial)}"
        self.ns_a, self.ns_b = f"{tag}A{n}", f"{tag}B{n}"
        self.dev_a, self.dev_b = f"{tag}vA{n}"[:15], f"{tag}vB{n}"[:15]
        self.ip_a, self.ip_b = IP_A, IP_B
        self.dest_host = IP_B
        try:
            sh("ip", "netns", "add", self.ns_a)
            sh("ip", "netns", "add", self.ns_b)
            sh("ip", "link", "add", self.dev_a, "netns", self.ns_a, "type", "veth",
               "peer", "name", self.dev_b, "netns", self.ns_b)
            for ns, dev, ip in ((self.ns_a, self.dev_a, IP_A), (self.ns_b, self.dev_b, IP_B)):
                sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", dev)
                sh("ip", "-n", ns, "link", "set", dev, "up")
                sh("ip", "-n", ns, "link", "set", "lo", "up")
        except BaseException:
            self.close()
            raise

    def prefix(self, side: str) -> list[str]:
        """The argv prefix that runs a command inside side A's or side B's namespace."""
        return ["ip", "netns", "exec", self.ns_a if side == "A" else self.ns_b]

    def shape(self, bits: int | None) -> list[str]:
        """Limit A->B to `bits`/s (None: unlimited). Returns no extra vm-migrate arguments:
        the kernel shapes the link itself."""
        sh("ip", "netns", "exec", self.ns_a, "tc", "qdisc", "del", "dev", self.dev_a, "root", check=False)
        if bits is not None:
            burst = max(bits // 8 // 250, 64 * 1024)
            sh("ip", "netns", "exec", self.ns_a, "tc", "qdisc", "add", "dev", self.dev_a, "root", "tbf",
               "rate", f"{bits}bit", "burst", str(burst), "latency", "50ms")
        return []

    def qdisc(self) -> str:
        """What `tc` reports for A's side of the link (rate, bytes sent)."""
        return sh("ip", "netns", "exec", self.ns_a, "tc", "-s", "qdisc", "show", "dev", self.dev_a,
                  check=False).stdout

    def close(self) -> None:
        """Delete both namespaces (and with them the veth pair); safe to call twice."""
        for ns in (self.ns_a, self.ns_b):
            sh("ip", "netns", "del", ns, check=False)
