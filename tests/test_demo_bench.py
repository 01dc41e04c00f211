"""What `make demo` and `make bench` read and print: the summary's phases, the demo run whole,
and the report over a result file of the previous format. No timing is asserted: the figures
come from `make bench`."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import BIN

ROOT = Path(__file__).resolve().parents[1]
PHASES = ("handshake", "start_up", "data", "tail")


@pytest.mark.parametrize("method", ["none", "stream", "xenguest"])
def test_summary_phases_tile_the_migration(hosts, receiver, method):
    a, b = hosts("A"), hosts("B")
    r = receiver(b)
    (a.root / "xenopsd.conf").write_text(f"migration-compressor = {'stream' if method == 'none' else method}\n")
    a.shim("vm-create", "vm1", "--memory", "32M", "--image", "mixed")
    out = a.shim("vm-migrate", "vm1", "--dest", r.address, "--json",
                 "--no-compress" if method == "none" else "--compress")
    summary = json.loads(out.stdout)
    phases = summary["phases"]
    assert tuple(phases) == PHASES and all(v >= 0 for v in phases.values())
    assert sum(phases.values()) == pytest.approx(summary["total_seconds"], abs=0.005)
    b.shim("vm-destroy", "vm1")


def test_demo_migrates_one_vm_by_every_method():
    env = {**os.environ, "DEMO_MEMORY": "32M", "PATH": f"{BIN}:{os.environ.get('PATH', '')}"}
    proc = subprocess.run([sys.executable, "-m", "harness.demo"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert out.count("matches; the VM runs on host") == 3 and "FAILED" not in out
    assert "-mode hvm_save" in out and "-mode hvm_restore" in out and "-compress true" in out
    assert "/usr/bin/zstd --fast" in out
    table = out[out.index("\nmethod ") + 1:].splitlines()[1:]
    assert [line.split()[0] for line in table] == ["none", "stream", "xenguest"]


def test_report_reads_the_previous_format(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    from bench.report import targets, write_markdown

    old = json.loads((ROOT / "bench" / "results.json").read_text())
    new = {**old, "results": [{**r, "size": old["size"]} for r in old["results"]]}
    write_markdown(new, tmp_path / "results.md", old)
    text = (tmp_path / "results.md").read_text()
    assert "| target | previous run | this run | met |" in text
    slower = targets(new, old)[-1]
    assert slower[0].startswith("nothing gets slower") and slower[2] is True
