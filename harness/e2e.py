"""`make e2e`: migrations across every method and option, checked, failing loudly.

For each case a VM is created on host A, migrated with --verify, and must
then run on B only, with its vGPU memory identical. One line per case;
exit 1 at the first failure.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from .sandbox import BIN, Sandbox, two_hosts

CASES = [(method, live, vgpu) for method in ("none", "stream", "xenguest")
         for live in (True, False) for vgpu in (False, True)]


def _vgpu_digest(box: Sandbox, root: Path) -> list[str]:
    out = subprocess.run([str(BIN / "xenemu"), "--root", str(root), "digest", "vm", "--context"], env=box.env,
                         capture_output=True, text=True, check=True).stdout
    return [line for line in out.splitlines() if line.startswith("vgpu ")]


def run_case(box: Sandbox, memory: str, method: str, live: bool, vgpu: bool) -> str | None:
    """None when the case passed, else what went wrong."""
    import json

    (box.host_a / "xenopsd.conf").write_text(f"migration-compressor = {'stream' if method == 'none' else method}\n")
    box.shim(box.host_a, "vm-create", "vm", "--memory", memory, "--image", "mixed", "--workload", "dirty:50MB/s",
             *(["--vgpu", "32M"] if vgpu else []), check=True)
    before = _vgpu_digest(box, box.host_a)
    mig = box.shim(box.host_a, "vm-migrate", "vm", "--dest", box.dest, "--verify", "--json",
                   "--no-compress" if method == "none" else "--compress", "--live" if live else "--non-live")
    if mig.returncode != 0:
        return mig.stderr.strip()
    s = json.loads(mig.stdout)
    problems = [p for p, bad in (
        (f"mode {s['mode']}", s["mode"] != method), ("still on source", bool(box.vms(box.host_a))),
        ("not running on destination", [d["state"] for d in box.vms(box.host_b)] != ["running"]),
        ("vGPU memory differs", _vgpu_digest(box, box.host_b) != before)) if bad]
    print(f"{method:<9} {str(live):<5} {str(vgpu):<5} {s['total_seconds']:>8.2f} {s['downtime_seconds']:>7.3f} "
          f"{s['iterations']:>4} {s['wire_bytes'] / 2**20:>9.1f}  {'FAILED' if problems else 'ok'}", flush=True)
    box.shim(box.host_b, "vm-destroy", "vm")
    return ", ".join(problems) or None


def main() -> int:
    memory = os.environ.get("E2E_MEMORY", "128M")
    with two_hosts("xenmig-e2e-") as box:
        print(f"{'method':<9} {'live':<5} {'vgpu':<5} {'total s':>8} {'down s':>7} {'iter':>4} {'wire MiB':>9}  result",
              flush=True)
        for method, live, vgpu in CASES:
            failed = run_case(box, memory, method, live, vgpu)
            if failed:
                print(f"e2e FAILED: {method} live={live} vgpu={vgpu}: {failed}", file=sys.stderr)
                return 1
    print(f"e2e: all {len(CASES)} cases passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
