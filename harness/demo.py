"""`make demo`: what the project is for, in well under a minute. One VM is live-migrated
between two emulated hosts on this machine three times, once by each method (uncompressed,
the external zstd stream, xenguest's in-band compression), then the three are compared.

Everything runs as the real executables in a temporary directory, which is removed at the
end, with every process it started. The guest is idle, so its memory digest must be the same
before and after each migration (`make e2e` migrates guests that keep writing, with --verify).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from xenopsd_shim.zstdpipe import COMPRESS_ARGV, DECOMPRESS_ARGV

from .sandbox import BIN, Sandbox, two_hosts

VM = "demo-vm"


@dataclass(frozen=True)
class Hop:
    """One migration: the method, and which way (the VM goes back and forth)."""
    method: str               # none | stream | xenguest
    forth: bool               # A -> B (else B -> A)


HOPS = (Hop("none", True), Hop("stream", False), Hop("xenguest", True))
WHAT = {"none": "uncompressed", "stream": "an external zstd process on each side's stream",
        "xenguest": "xenguest compresses pages itself (in-band records)"}


def _digest(box: Sandbox, root: Path) -> str:
    return subprocess.run([str(BIN / "xenemu"), "--root", str(root), "digest", VM], env=box.env,
                          capture_output=True, text=True, check=True).stdout.strip()


def _spawned(root: Path) -> str:
    """The last emu-manager this host's shim started, as its log says (its real argv)."""
    lines = [line for line in (root / "xenopsd.log").read_text().splitlines() if "spawned " in line]
    argv = lines[-1].split("spawned ", 1)[1].split() if lines else ["?"]
    return " ".join([Path(argv[0]).name, *argv[1:]])


def migrate(box: Sandbox, hop: Hop, before: str) -> dict:
    """Migrate, print what ran and what arrived; the summary, with the hop's checks in "problems"."""
    src, dst = (box.host_a, box.host_b) if hop.forth else (box.host_b, box.host_a)
    dest = box.dest if hop.forth else box.dest_a
    assert dest is not None
    # The method: the source's xenopsd.conf names the compressor, the call says whether to compress.
    (src / "xenopsd.conf").write_text(f"migration-compressor = {'stream' if hop.method == 'none' else hop.method}\n")
    flag = "--no-compress" if hop.method == "none" else "--compress"
    names = {box.host_a: "A", box.host_b: "B"}
    print(f"\n{hop.method}: {WHAT[hop.method]}, host {names[src]} -> host {names[dst]}")
    print(f"  $ xenopsd-shim --root host{names[src]} vm-migrate {VM} --dest {dest} {flag} --json")
    mig = box.shim(src, "vm-migrate", VM, "--dest", dest, flag, "--json")
    if mig.returncode != 0:
        raise RuntimeError(mig.stderr.strip())
    summary = json.loads(mig.stdout)
    print(f"  source       {_spawned(src)}")
    print(f"  destination  {_spawned(dst)}")
    if hop.method == "stream":          # xenopsd's own zstd on each side, between the image and the socket
        print(f"  source       {' '.join(COMPRESS_ARGV)}\n  destination  {' '.join(DECOMPRESS_ARGV)}")
    after = _digest(box, dst)
    on_src, on_dst = box.vms(src), box.vms(dst)
    problems = [p for p, bad in ((f"mode {summary['mode']}", summary["mode"] != hop.method),
                                 ("memory digest differs", after != before),
                                 ("still on the source", bool(on_src)),
                                 ("not running on the destination", [d["state"] for d in on_dst] != ["running"]))
                if bad]
    print(f"  memory digest on host {names[dst]} {after[:16]}... "
          f"{'matches' if after == before else 'DIFFERS'}; the VM runs on host {names[dst]} only"
          if not problems else f"  FAILED: {', '.join(problems)}")
    return {**summary, "problems": problems}


def table(runs: dict[str, dict]) -> list[str]:
    lines = [f"{'method':<9} {'time s':>7} {'downtime s':>10} {'wire MiB':>9} {'ratio':>6} {'CPU s':>6}  "
             "CPU by process (source + destination)"]
    for method, s in runs.items():
        roles: dict[str, float] = {}
        for side in s["cpu_seconds"].values():
            for role, secs in side.items():
                roles[role] = roles.get(role, 0.0) + secs
        lines.append(f"{method:<9} {s['total_seconds']:>7.2f} {s['downtime_seconds']:>10.3f} "
                     f"{s['wire_bytes'] / 2**20:>9.1f} {s['memory_bytes'] / s['wire_bytes']:>6.2f} "
                     f"{sum(roles.values()):>6.2f}  " + ", ".join(f"{k} {v:.2f}" for k, v in sorted(roles.items())))
    return lines


def main() -> int:
    memory = os.environ.get("DEMO_MEMORY", "256M")   # the size the benchmark's targets name
    with two_hosts("xenmig-demo-", both_ways=True) as box:
        print(f"host A {box.host_a} (receiving on {box.dest_a})\nhost B {box.host_b} (receiving on {box.dest})")
        out = box.shim(box.host_a, "vm-create", VM, "--memory", memory, "--image", "mixed", check=True)
        before = _digest(box, box.host_a)
        print(f"created {VM} ({out.stdout.strip()}) on host A: {memory}, 'mixed' memory (zero, code-like, "
              f"text-like and random pages), idle guest\n  memory digest {before[:16]}...")
        runs: dict[str, dict] = {}
        for hop in HOPS:
            try:
                runs[hop.method] = migrate(box, hop, before)
            except RuntimeError as e:
                print(f"demo FAILED: {hop.method}: {e}", file=sys.stderr)
                return 1
        print("\nThe same VM, the same bytes, each method (live migration over loopback; one run each, so "
              "expect noise;\n`make bench` gives medians, links shaped to 10 and 1 Gbit/s, and the targets):\n")
        print("\n".join(table(runs)))
        return 1 if any(r["problems"] for r in runs.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
