"""Two emulated hosts and a receiver in a temporary directory, for `make demo` and `make e2e`.

Everything it starts is stopped, and the directory removed, on the way out.
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
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

BIN = Path(sys.executable).parent


@dataclass
class Sandbox:
    host_a: Path
    host_b: Path
    dest: str                   # where host B's receiver listens
    env: dict[str, str]
    dest_a: str | None = None   # where host A's listens, when both do (migrations both ways)

    def shim(self, root: Path, *argv: str, check: bool = False) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "xenopsd-shim"), "--root", str(root), *argv], text=True,
                              capture_output=True, env=self.env, check=check)

    def vms(self, root: Path) -> list[dict]:
        return json.loads(self.shim(root, "vm-list", "--json").stdout or "[]")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_listening(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"the receiver did not listen on port {port}")


@contextmanager
def two_hosts(prefix: str, both_ways: bool = False) -> Iterator[Sandbox]:
    """Host B receives; with `both_ways` host A too."""
    workdir = Path(tempfile.mkdtemp(prefix=prefix))
    ports = {"B": _free_port(), **({"A": _free_port()} if both_ways else {})}
    env = {**os.environ, "PATH": f"{BIN}:{os.environ.get('PATH', '')}"}
    box = Sandbox(workdir / "hostA", workdir / "hostB", f"127.0.0.1:{ports['B']}", env,
                  f"127.0.0.1:{ports['A']}" if both_ways else None)
    box.host_a.mkdir()
    receivers = [subprocess.Popen([str(BIN / "xenopsd-shim"), "--root", str(workdir / f"host{side}"), "serve",
                                   "--listen", f"127.0.0.1:{port}"], stderr=subprocess.DEVNULL, env=env)
                 for side, port in ports.items()]
    try:
        for port in ports.values():
            _wait_listening(port)
        yield box
    finally:
        for root in (box.host_a, box.host_b):
            for d in box.vms(root):
                box.shim(root, "vm-destroy", d["uuid"])
        for receiver in receivers:
            receiver.send_signal(signal.SIGTERM)
            receiver.wait(timeout=60)
        shutil.rmtree(workdir, ignore_errors=True)
