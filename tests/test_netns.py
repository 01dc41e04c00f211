"""`make e2e-netns` as a process: every method live across two network namespaces and a shaped veth.

Runs the entry point exactly as `make e2e-netns` does (as root; skipped otherwise), with its
host directories under a temporary directory of its own, and checks its table, its exit code, and that
it leaves no namespace, process or directory behind, on success and when interrupted.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

import psutil
import pytest

from conftest import BIN, processes_of

ROW = re.compile(r"^(none|stream|xenguest)\s+([\d.]+)\s+([\d.]+)\s+(\d+)\s+([\d,]+)\s+([\d.]+)\s+(ok|FAILED)$")

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="e2e-netns needs root (network namespaces, veth, tc)")


def _start(short_tmp: Path, **env: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "harness.e2e_netns"], cwd=Path(__file__).parents[1],
                            env={**os.environ, "PATH": f"{BIN}:{os.environ.get('PATH', '')}",
                                 "TMPDIR": str(short_tmp), **env},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """The hosts' parent directory: short, because a host's run directory holds a Unix socket
    (xenguest-control-<domid>) and a socket path is limited to 107 bytes; tmp_path is too long."""
    path = Path(tempfile.mkdtemp(prefix="xmn-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _namespaces_of(pid: int) -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in out.splitlines() if re.fullmatch(rf"xme[AB]{pid}x\d+", line.split()[0])]


def _running(short_tmp: Path, name: str) -> bool:
    for p in processes_of(short_tmp):
        try:
            if name in " ".join(p.cmdline()[:2]):
                return True
        except psutil.Error:
            continue
    return False


def _assert_nothing_left(short_tmp: Path, pid: int) -> None:
    assert _namespaces_of(pid) == []
    assert list(short_tmp.iterdir()) == []                       # both host directories removed
    assert processes_of(short_tmp) == []


@needs_root
@pytest.mark.slow          # 35 s: `make e2e-netns` itself, run by `make check-all`
def test_e2e_netns_every_method_across_a_shaped_link(short_tmp):
    t0 = time.monotonic()
    proc = _start(short_tmp)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, out + err
    lines = out.splitlines()
    assert "shaped by tc tbf to 1gbit" in lines[0] and "10.199.0.2:" in lines[0]
    rows = {m.group(1): m for m in map(ROW.match, lines) if m}
    assert list(rows) == ["none", "stream", "xenguest"], out
    for m in rows.values():
        total, downtime, wire, ratio = float(m.group(2)), float(m.group(3)), int(m.group(5).replace(",", "")), \
            float(m.group(6))
        assert m.group(7) == "ok" and 0 < downtime < total and wire > 0 and ratio > 0
    # 1 Gbit/s is 125 MB/s: the uncompressed stream cannot have crossed faster than that.
    none_total, none_wire = float(rows["none"].group(2)), int(rows["none"].group(5).replace(",", ""))
    assert none_wire / none_total < 125e6
    assert float(rows["stream"].group(6)) > 1 and float(rows["xenguest"].group(6)) > 1
    assert lines[-1] == "e2e-netns: all 3 methods passed" and err == ""
    _assert_nothing_left(short_tmp, proc.pid)
    print(f"e2e-netns wall time {time.monotonic() - t0:.1f} s\n{out}")


@needs_root
def test_e2e_netns_interrupted_mid_migration_cleans_up(short_tmp):
    proc = _start(short_tmp, E2E_MEMORY="64M")
    deadline = time.monotonic() + 120
    while not _running(short_tmp, "xenguest"):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)                  # Ctrl-C: the whole process group
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "interrupted" in err, out + err
    _assert_nothing_left(short_tmp, proc.pid)


def test_e2e_netns_skips_without_ip_and_tc(short_tmp):
    proc = subprocess.run([sys.executable, "-m", "harness.e2e_netns"], cwd=Path(__file__).parents[1],
                          env={**os.environ, "PATH": str(short_tmp)}, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0
    reason = "needs root" if os.geteuid() != 0 else "needs ip and tc"
    assert proc.stdout.startswith("e2e-netns: skipped: ") and reason in proc.stdout and proc.stdout.count("\n") == 1
