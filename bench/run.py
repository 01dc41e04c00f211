"""`make bench`: which compression method wins where, measured side by side in one run.

Every migration is a real one between two emulated hosts (the executables
as users run them). Methods are interleaved within each repetition so a
noisy machine hurts them alike; the report gives medians. Links are shaped
for real (two network namespaces joined by a veth pair, `tc tbf` on it) when
running as root, else by the shim's --max-bandwidth (kernel socket pacing);
the report says which. Reference points (zstd CLI alone, zstd | zstd -d,
a plain socket copy) are timed on the very memory bytes the VMs start with.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from harness import netns
from harness.netns import NetnsLink, sh

BIN = Path(sys.executable).parent
OUT = Path(__file__).resolve().parent
LINKS = {"unlimited": None, "10gbit": 10_000_000_000, "1gbit": 1_000_000_000}     # bits/s
METHODS = ("none", "stream", "xenguest")


# Links ------------------------------------------------------------------------------
class Link:
    """Where the receiver listens and how a given rate is imposed."""
    kind = "max-bandwidth (kernel socket pacing in the shim)"

    def __init__(self) -> None:
        self.dest_host = "127.0.0.1"

    def prefix(self, side: str) -> list[str]:
        return []

    def shape(self, bits: int | None) -> list[str]:
        """Extra vm-migrate arguments for this rate (none when tc does it)."""
        return [] if bits is None else ["--max-bandwidth", f"{bits // 8}"]

    def close(self) -> None:
        pass


def make_link(force_pacing: bool) -> Link:
    if not force_pacing and netns.unavailable() is None:
        try:
            return NetnsLink("xmb")     # type: ignore[return-value]   (the same interface as Link)
        except subprocess.CalledProcessError as e:
            print(f"network namespaces unavailable ({e.stderr.strip()}); using socket pacing", file=sys.stderr)
    return Link()


# Hosts --------------------------------------------------------------------------------
@dataclass
class Bench:
    link: Link
    root_a: Path
    root_b: Path
    dest: str
    env: dict[str, str]

    def shim(self, side: str, *argv: str, check: bool = True) -> subprocess.CompletedProcess:
        root = self.root_a if side == "A" else self.root_b
        return sh(*self.link.prefix(side), str(BIN / "xenopsd-shim"), "--root", str(root), *argv, check=check,
                  env=self.env)


@contextmanager
def hosts(link: Link) -> Iterator[Bench]:
    work = Path(tempfile.mkdtemp(prefix="xenmig-bench-"))
    env = {**os.environ, "PATH": f"{BIN}:{os.environ.get('PATH', '')}"}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    bench = Bench(link, work / "A", work / "B", f"{link.dest_host}:{port}", env)
    bench.root_a.mkdir()
    receiver = subprocess.Popen([*link.prefix("B"), str(BIN / "xenopsd-shim"), "--root", str(bench.root_b),
                                 "serve", "--listen", bench.dest], env=env, stderr=subprocess.PIPE, text=True)
    assert receiver.stderr is not None
    receiver.stderr.readline()          # "listening on ..."
    threading.Thread(target=receiver.stderr.read, daemon=True).start()
    try:
        yield bench
    finally:
        receiver.terminate()
        receiver.wait(timeout=60)
        for side in ("A", "B"):
            for vm in json.loads(bench.shim(side, "vm-list", "--json", check=False).stdout or "[]"):
                bench.shim(side, "vm-destroy", vm["uuid"], check=False)
        shutil.rmtree(work, ignore_errors=True)


# Reference points -------------------------------------------------------------------------
def _mbps(nbytes: int, seconds: float) -> float:
    return round(nbytes / seconds / 1e6, 1)


def references(memory: Path) -> dict[str, float]:
    """MB/s of guest memory for the limits a method can approach, on the same bytes."""
    size = memory.stat().st_size
    out: dict[str, float] = {}
    t = time.monotonic()
    compressed = sh("/usr/bin/zstd", "--fast", "-c", str(memory), check=True, text=False).stdout
    out["zstd --fast CLI"] = _mbps(size, time.monotonic() - t)
    out["zstd --fast ratio"] = round(size / len(compressed), 3)
    t = time.monotonic()
    subprocess.run(f"/usr/bin/zstd --fast -c {memory} | /usr/bin/zstd -d -c > /dev/null", shell=True, check=True)
    out["zstd --fast, piped to zstd -d"] = _mbps(size, time.monotonic() - t)
    srv = socket.create_server(("127.0.0.1", 0))

    def sink() -> None:
        conn, _ = srv.accept()
        with conn:
            buf = bytearray(1 << 20)
            while conn.recv_into(buf):
                pass
    th = threading.Thread(target=sink)
    th.start()
    t = time.monotonic()
    with socket.create_connection(srv.getsockname()) as c, open(memory, "rb") as f:
        c.sendfile(f)
    th.join()
    srv.close()
    out["plain socket copy"] = _mbps(size, time.monotonic() - t)
    return out


# Runs ----------------------------------------------------------------------------------------
def migrate_once(b: Bench, size: str, profile: str, workload: str, method: str, link_args: list[str]) -> dict:
    (b.root_a / "xenopsd.conf").write_text(f"migration-compressor = {'stream' if method == 'none' else method}\n")
    b.shim("A", "vm-create", "vm", "--memory", size, "--image", profile, "--workload", workload)
    if workload != "none":
        time.sleep(0.5)
    proc = b.shim("A", "vm-migrate", "vm", "--dest", b.dest, "--json", *link_args,
                  "--no-compress" if method == "none" else "--compress", check=False)
    if proc.returncode != 0:
        b.shim("A", "vm-destroy", "vm", check=False)
        raise RuntimeError(f"{method} {profile} {workload}: {proc.stderr.strip()}")
    b.shim("B", "vm-destroy", "vm")
    return json.loads(proc.stdout)


def summarise(runs: list[dict]) -> dict[str, Any]:
    med = lambda xs: round(statistics.median(xs), 3)  # noqa: E731
    roles: dict[str, list[float]] = {}
    for r in runs:
        totals: dict[str, float] = {}
        for side in r["cpu_seconds"].values():
            for role, secs in side.items():
                totals[role] = totals.get(role, 0.0) + secs
        for role, secs in totals.items():
            roles.setdefault(role, []).append(secs)
    cpu = {role: med(v) for role, v in sorted(roles.items())}
    return {
        "runs": len(runs),
        "total_seconds": med([r["total_seconds"] for r in runs]),
        "downtime_seconds": med([r["downtime_seconds"] for r in runs]),
        "wire_bytes": int(statistics.median([r["wire_bytes"] for r in runs])),
        "ratio": med([r["memory_bytes"] / r["wire_bytes"] for r in runs]),
        "guest_mbps": med([r["memory_bytes"] / r["total_seconds"] / 1e6 for r in runs]),
        "cpu_seconds": cpu, "cpu_total": round(sum(cpu.values()), 3),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="256 MiB VMs, fewer cases (under 10 minutes)")
    ap.add_argument("--size", default=None)
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--pacing", action="store_true", help="shape links with --max-bandwidth even as root")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    size = args.size or ("256M" if args.quick else "1G")
    reps = args.reps or (3 if args.quick else 5)
    profiles = ("idle", "mixed", "busy", "random")       # busy: no zero page left, every page compressed
    cases = [(p, w, link) for link in LINKS for p in profiles for w in ("none", "dirty:50MB/s")
             if not (args.quick and w != "none" and (p != "mixed" or link != "unlimited"))]
    link = make_link(args.pacing)
    results: list[dict] = []
    refs: dict[str, dict] = {}
    started = time.monotonic()
    try:
        with hosts(link) as b:
            for profile in profiles:
                b.shim("A", "vm-create", "ref", "--memory", size, "--image", profile)
                refs[profile] = references(next((b.root_a / "domains").iterdir()) / "memory")
                b.shim("A", "vm-destroy", "ref")
            for profile, workload, link_name in cases:
                link_args = link.shape(LINKS[link_name])
                runs: dict[str, list[dict]] = {m: [] for m in METHODS}
                for _ in range(reps):
                    for method in METHODS:        # interleaved
                        runs[method].append(migrate_once(b, size, profile, workload, method, link_args))
                for method in METHODS:
                    row = {"profile": profile, "workload": workload, "link": link_name, "method": method,
                           **summarise(runs[method])}
                    results.append(row)
                    print(json.dumps(row), flush=True)
            link.shape(None)
    finally:
        link.close()
    report = {"size": size, "reps": reps, "link_shaping": link.kind, "cpus": os.cpu_count(),
              "seconds": round(time.monotonic() - started, 1), "references": refs, "results": results}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(report, indent=1))
    from .report import write_markdown, write_plot

    write_markdown(report, args.out / "results.md")
    write_plot(report, args.out / "migration-time.png")
    print((args.out / "results.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
