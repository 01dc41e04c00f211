"""`make e2e-netns`: live migrations across a real, shaped network link, every method, checked.

Two network namespaces joined by a veth pair shaped by `tc tbf` to 1 Gbit/s
(harness/netns.py); host A in one, host B in the other, each its own
directory. `xenopsd-shim serve` listens on B's address inside B's namespace;
each method (none, stream, xenguest) live-migrates a running VM from inside
A's namespace with --verify (the destination checks every page against the
source's pause point), and the VM must then run on B only, and its bytes must
have crossed the shaped link. One table row a method; exit 1 at the first
failure. Without root, `ip` or `tc` it says why on one line and exits 0.
Namespaces, processes and host directories go on every way out, Ctrl-C included.

Environment: E2E_MEMORY (256M), E2E_WORKLOAD (increment), E2E_RATE (1gbit).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from . import netns
from .netns import NetnsLink

BIN = Path(sys.executable).parent
METHODS = ("none", "stream", "xenguest")
RATES = {"1gbit": 1_000_000_000, "10gbit": 10_000_000_000, "100mbit": 100_000_000}


class _Terminated(BaseException):
    """SIGTERM/SIGHUP, turned into an exception so the clean-up runs as for Ctrl-C."""


def _on_signal(signum: int, _frame: Any) -> None:
    raise _Terminated(signal.Signals(signum).name)


class NetnsHosts:
    """Host A and host B, each a directory of its own, each used from inside its namespace."""

    def __init__(self, link: NetnsLink) -> None:
        self.link = link
        self.roots = {side: Path(tempfile.mkdtemp(prefix=f"xenmig-netns-{side}-")) for side in "AB"}
        self.env = {**os.environ, "PATH": f"{BIN}:{os.environ.get('PATH', '')}"}
        self.receiver: subprocess.Popen | None = None
        self.receiver_log: list[str] = []
        self.dest = ""

    def argv(self, side: str, *args: str) -> list[str]:
        return [*self.link.prefix(side), str(BIN / "xenopsd-shim"), "--root", str(self.roots[side]), *args]

    def shim(self, side: str, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(self.argv(side, *args), env=self.env, capture_output=True, text=True, timeout=600)

    def vms(self, side: str) -> list[dict]:
        return json.loads(self.shim(side, "vm-list", "--json").stdout or "[]")

    def serve(self) -> None:
        """`serve` on B's address, inside B's namespace; returns once it listens."""
        self.receiver = subprocess.Popen(self.argv("B", "serve", "--listen", f"{self.link.ip_b}:0"),
                                         env=self.env, stderr=subprocess.PIPE, text=True)
        assert self.receiver.stderr is not None
        line = self.receiver.stderr.readline()
        if not line.startswith("listening on "):
            raise RuntimeError(f"serve did not start: {line.strip() or 'no output'}")
        self.dest = line.split()[-1]
        threading.Thread(target=lambda: self.receiver_log.extend(self.receiver.stderr), daemon=True).start()

    def close(self) -> list[str]:
        """Stop everything started; what had to be forced, if anything."""
        forced: list[str] = []
        if self.receiver is not None and self.receiver.poll() is None:
            self.receiver.terminate()
            try:
                self.receiver.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.receiver.kill()
                self.receiver.wait()
                forced.append(f"serve (pid {self.receiver.pid}) killed")
        for side, root in self.roots.items():
            if (root / "domains").exists():
                for vm in self.vms(side):
                    self.shim(side, "vm-destroy", vm["uuid"])
        for side in "AB":
            forced += netns_stragglers(self.link, side)
        for root in self.roots.values():
            shutil.rmtree(root, ignore_errors=True)
        return forced


def netns_stragglers(link: NetnsLink, side: str) -> list[str]:
    """Kill whatever still runs in one of the link's namespaces (all of it was started here)."""
    ns = link.ns_a if side == "A" else link.ns_b
    pids = [int(p) for p in netns.sh("ip", "netns", "pids", ns, check=False).stdout.split()]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 5
        while pids and time.monotonic() < deadline:
            pids = [p for p in pids if Path(f"/proc/{p}").exists()]
            time.sleep(0.05)
    return [f"{len(pids)} process(es) left in namespace {ns} killed"] if pids else []


def _tc_sent(link: NetnsLink) -> int:
    m = re.search(r"Sent (\d+) bytes", link.qdisc())
    return int(m.group(1)) if m else 0


def run_method(hosts: NetnsHosts, method: str, memory: str, workload: str) -> tuple[dict | None, str | None]:
    """(summary, None) when the method passed, else (summary or None, what went wrong)."""
    (hosts.roots["A"] / "xenopsd.conf").write_text(
        f"migration-compressor = {'stream' if method == 'none' else method}\n")
    made = hosts.shim("A", "vm-create", "vm", "--memory", memory, "--image", "mixed", "--workload", workload)
    if made.returncode != 0:
        return None, f"vm-create: {made.stderr.strip()}"
    time.sleep(0.5)                                   # the guest is writing before the migration starts
    sent_before = _tc_sent(hosts.link)
    mig = hosts.shim("A", "vm-migrate", "vm", "--dest", hosts.dest, "--live", "--verify", "--json",
                     "--no-compress" if method == "none" else "--compress")
    if mig.returncode != 0:
        hosts.shim("A", "vm-destroy", "vm")
        return None, mig.stderr.strip() or f"vm-migrate exited {mig.returncode}"
    s = json.loads(mig.stdout)
    crossed = _tc_sent(hosts.link) - sent_before
    problems = [p for p, bad in (
        (f"mode {s['mode']}", s["mode"] != method),
        ("not verified", s.get("verified") is not True),
        ("still on source", bool(hosts.vms("A"))),
        ("not running on destination", [d["state"] for d in hosts.vms("B")] != ["running"]),
        (f"only {crossed} bytes crossed the shaped link for {s['wire_bytes']} on the wire",
         crossed < s["wire_bytes"]),
    ) if bad]
    hosts.shim("B", "vm-destroy", "vm")
    return s, ", ".join(problems) or None


def row(method: str, s: dict, failed: str | None) -> str:
    ratio = s["memory_bytes"] / s["wire_bytes"] if s["wire_bytes"] else 0.0
    return (f"{method:<9} {s['total_seconds']:>8.2f} {s['downtime_seconds']:>10.3f} {s['iterations']:>5} "
            f"{s['wire_bytes']:>13,} {ratio:>6.2f}  {'FAILED' if failed else 'ok'}")


def main() -> int:
    why = netns.unavailable()
    if why:
        print(f"e2e-netns: skipped: {why}")
        return 0
    memory = os.environ.get("E2E_MEMORY", "256M")
    workload = os.environ.get("E2E_WORKLOAD", "increment")
    rate_name = os.environ.get("E2E_RATE", "1gbit")
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _on_signal)
    link: NetnsLink | None = None
    hosts: NetnsHosts | None = None
    code = 1
    try:
        link = NetnsLink("xme")
        link.shape(RATES[rate_name])
        hosts = NetnsHosts(link)
        hosts.serve()
        print(f"e2e-netns: {memory} mixed VM, workload {workload}, live, --verify; "
              f"{link.ns_a} ({link.ip_a}) -> {link.ns_b} ({hosts.dest}), veth shaped by tc tbf to {rate_name}",
              flush=True)
        print("(downtime: from the pause until the destination runs the VM, the --verify check included)",
              flush=True)
        print(f"{'method':<9} {'total s':>8} {'downtime s':>10} {'iter':>5} {'wire bytes':>13} {'ratio':>6}  result",
              flush=True)
        for method in METHODS:
            summary, failed = run_method(hosts, method, memory, workload)
            if summary is not None:
                print(row(method, summary, failed), flush=True)
            if failed:
                print(f"e2e-netns FAILED: {method}: {failed}", file=sys.stderr)
                return 1
        print(f"e2e-netns: all {len(METHODS)} methods passed")
        code = 0
    except (KeyboardInterrupt, _Terminated) as e:
        print(f"e2e-netns: interrupted ({type(e).__name__ if isinstance(e, KeyboardInterrupt) else e}); "
              "cleaning up", file=sys.stderr)
        code = 130
    except (subprocess.CalledProcessError, RuntimeError, OSError) as e:
        detail = e.stderr.strip() if isinstance(e, subprocess.CalledProcessError) and e.stderr else str(e)
        print(f"e2e-netns FAILED: setting up: {detail}", file=sys.stderr)
        code = 1
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)         # a second Ctrl-C must not cut the clean-up short
        forced = hosts.close() if hosts is not None else []
        if link is not None:
            link.close()
        for text in forced:
            print(f"e2e-netns: clean-up: {text}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
