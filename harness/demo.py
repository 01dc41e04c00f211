"""`make demo`: a live migration between two emulated hosts on this machine, explained.

Everything runs as the real executables in a temporary directory, which is
removed at the end, with every process it started.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from .sandbox import two_hosts


def main() -> int:
    memory = os.environ.get("DEMO_MEMORY", "512M")
    with two_hosts("xenmig-demo-") as box:
        print(f"hosts: {box.host_a} (source), {box.host_b} (destination, receiving on {box.dest})")
        out = box.shim(box.host_a, "vm-create", "demo-vm", "--memory", memory, "--image", "mixed",
                       "--workload", "dirty:50MB/s", check=True)
        print(f"created VM demo-vm ({out.stdout.strip()}): {memory}, 'mixed' memory, guest dirtying 50 MB/s")
        print("live migration with --verify (every page checked at the destination)...")
        mig = box.shim(box.host_a, "vm-migrate", "demo-vm", "--dest", box.dest, "--verify", "--json")
        if mig.returncode != 0:
            print(mig.stderr.strip(), file=sys.stderr)
            return 1
        summary = json.loads(mig.stdout)
        print(f"  status          {summary['status']}")
        print(f"  total time      {summary['total_seconds']:.2f} s")
        print(f"  downtime        {summary['downtime_seconds']:.3f} s")
        print(f"  iterations      {summary['iterations']} ({summary['pages_sent']} pages sent)")
        print(f"  memory / wire   {summary['memory_bytes'] >> 20} MiB / {summary['wire_bytes'] / 2**20:.1f} MiB")
        print(f"  compression     {summary['mode']} (pool default; try: xenopsd-shim pool-param-set "
              "migration-compression=true)")
        for side, roles in summary["cpu_seconds"].items():
            print(f"  cpu ({side:<11}) " + ", ".join(f"{k} {v:.2f}s" for k, v in sorted(roles.items())))
        print("  emu-manager     " + " ".join([Path(summary["emu_manager_argv"][0]).name,
                                               *summary["emu_manager_argv"][1:]]))
        on_a, on_b = box.vms(box.host_a), box.vms(box.host_b)
        print(f"source host now has {len(on_a)} VM(s); destination: "
              + ", ".join(f"{d['name']} {d['state']}" for d in on_b))
        return 0 if not on_a and [d["state"] for d in on_b] == ["running"] else 1


if __name__ == "__main__":
    sys.exit(main())
