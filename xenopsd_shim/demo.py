"""`make demo`: a live migration between two emulated hosts on this machine, explained.

Everything runs as the real executables in a temporary directory, which is
removed at the end, with every process it started.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _shim(root: Path, *argv: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "xenopsd-shim"), "--root", str(root), *argv], text=True,
                          capture_output=True, **kw)


def main() -> int:
    memory = os.environ.get("DEMO_MEMORY", "512M")
    workdir = Path(tempfile.mkdtemp(prefix="xenmig-demo-"))
    host_a, host_b = workdir / "hostA", workdir / "hostB"
    port = _free_port()
    env = {**os.environ, "PATH": f"{BIN}:{os.environ.get('PATH', '')}"}
    receiver = subprocess.Popen([str(BIN / "xenopsd-shim"), "--root", str(host_b), "serve", "--listen",
                                 f"127.0.0.1:{port}"], stderr=subprocess.DEVNULL, env=env)
    try:
        print(f"hosts: {host_a} (source), {host_b} (destination, receiving on 127.0.0.1:{port})")
        out = _shim(host_a, "vm-create", "demo-vm", "--memory", memory, "--image", "mixed",
                    "--workload", "dirty:50MB/s", check=True, env=env)
        print(f"created VM demo-vm ({out.stdout.strip()}): {memory}, 'mixed' memory, guest dirtying 50 MB/s")
        for _ in range(100):
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.1)
        print("live migration with --verify (every page checked at the destination)...")
        mig = _shim(host_a, "vm-migrate", "demo-vm", "--dest", f"127.0.0.1:{port}", "--verify", "--json", env=env)
        if mig.returncode != 0:
            print(mig.stderr.strip(), file=sys.stderr)
            return 1
        summary = json.loads(mig.stdout)
        print(f"  status          {summary['status']}")
        print(f"  total time      {summary['total_seconds']:.2f} s")
        print(f"  downtime        {summary['downtime_seconds']:.3f} s")
        print(f"  iterations      {summary['iterations']} ({summary['pages_sent']} pages sent)")
        print(f"  memory / wire   {summary['memory_bytes'] >> 20} MiB / {summary['wire_bytes'] / 2**20:.1f} MiB")
        print(f"  compression     {summary['mode']}")
        for side, roles in summary["cpu_seconds"].items():
            print(f"  cpu ({side:<11}) " + ", ".join(f"{k} {v:.2f}s" for k, v in sorted(roles.items())))
        print("  emu-manager     " + " ".join(Path(summary["emu_manager_argv"][0]).name.split()
                                              + summary["emu_manager_argv"][1:]))
        on_a = json.loads(_shim(host_a, "vm-list", "--json", env=env).stdout)
        on_b = json.loads(_shim(host_b, "vm-list", "--json", env=env).stdout)
        print(f"source host now has {len(on_a)} VM(s); destination: "
              + ", ".join(f"{d['name']} {d['state']}" for d in on_b))
        return 0 if not on_a and [d["state"] for d in on_b] == ["running"] else 1
    finally:
        for root in (host_a, host_b):
            for d in json.loads(_shim(root, "vm-list", "--json", env=env).stdout or "[]"):
                _shim(root, "vm-destroy", d["uuid"], env=env)
        receiver.send_signal(signal.SIGTERM)
        receiver.wait(timeout=60)
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
