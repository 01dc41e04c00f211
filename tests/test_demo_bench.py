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


def _old_row(link: str, method: str, seconds: float) -> dict:
    """A row as results.json had it before sizes and phases."""
    return {"profile": "mixed", "workload": "none", "link": link, "method": method, "runs": 3,
            "total_seconds": seconds, "downtime_seconds": 0.1, "wire_bytes": 100 << 20, "ratio": 2.6,
            "guest_mbps": 268 / seconds, "cpu_seconds": {"xenguest": seconds}, "cpu_total": seconds}


def test_report_reads_the_previous_format(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    from bench.report import targets, write_markdown

    old = {"size": "256M", "reps": 3, "link_shaping": "tc tbf", "cpus": 2, "seconds": 1.0,
           "references": {"mixed": {"zstd --fast CLI": 500.0}},
           "results": [_old_row(link, m, s) for link in ("unlimited", "1gbit")
                       for m, s in (("none", 0.8), ("stream", 1.6), ("xenguest", 1.2))]}
    new = {**old, "results": [{**r, "size": "256M", "phases": None} for r in old["results"]]}
    write_markdown(new, tmp_path / "results.md", old)
    text = (tmp_path / "results.md").read_text()
    assert "| target | previous run | this run | met |" in text
    found = {name: (figure, met) for name, figure, met in targets(new, old)}
    assert found["256 MiB in-band total time <= 0.6x stream, loopback"] == ("0.75x (1.2 / 1.6)", False)
    assert found["1 GiB in-band total time <= 0.6x stream, loopback"] == ("no data", None)
    [slower] = [v for k, v in found.items() if k.startswith("nothing gets slower")]
    assert slower[1] is True


def test_report_judges_a_case_slower_only_when_both_measures_say_so(monkeypatch):
    """A slow window (seconds up, CLI up alike) is no regression; a case slower in seconds and in
    CLI units is; a link-bound case is judged in seconds (the CLI does not follow the link)."""
    monkeypatch.syspath_prepend(str(ROOT))
    from bench.report import targets

    def run(cli: float, seconds: dict[tuple[str, str], float]) -> dict:
        return {"size": "256M", "reps": 3, "link_shaping": "tc tbf", "cpus": 2, "seconds": 1.0,
                "links": {"unlimited": None, "1gbit": 1_000_000_000},
                "references": {"mixed": {"zstd --fast CLI": cli}},
                "results": [{**_old_row(link, m, s), "size": "256M",
                             "wire_bytes": (256 if m == "none" else 100) << 20} for (link, m), s in seconds.items()]}

    def verdict(new: dict, old: dict) -> bool | None:
        return next(met for name, _, met in targets(new, old) if name.startswith("nothing gets slower"))

    base = {("unlimited", "none"): 0.8, ("unlimited", "xenguest"): 1.2, ("1gbit", "none"): 2.5}
    old = run(500.0, base)
    slow_window = run(250.0, {k: 2 * v for k, v in base.items() if k[0] == "unlimited"} | {("1gbit", "none"): 2.5})
    assert verdict(slow_window, old) is True
    regression = run(500.0, base | {("unlimited", "xenguest"): 1.8})
    assert verdict(regression, old) is False
    link_slower = run(250.0, base | {("1gbit", "none"): 3.5})     # CLI units would call it faster
    assert verdict(link_slower, old) is False


def test_report_measures_adaptive_against_its_fixed_choices(monkeypatch):
    """Issue 14's targets from rows: adaptive against the better fixed method case by case, the
    scenarios by their names; a missing scenario is no data, not a pass."""
    monkeypatch.syspath_prepend(str(ROOT))
    from bench.report import adaptive_targets

    def row(method: str, seconds: float, link: str = "unlimited", scenario: str | None = None, **more) -> dict:
        return {**_old_row(link, method, seconds), "size": "256M", **({"scenario": scenario} if scenario else {}),
                **more}

    report = {"size": "256M", "references": {}, "results": [
        row("none", 0.5), row("xenguest", 0.8), row("adaptive", 0.52),
        row("none", 2.5, "1gbit"), row("xenguest", 1.2, "1gbit"), row("adaptive", 1.3, "1gbit"),
        row("none", 4.7, "x", "link drop"), row("xenguest", 3.2, "x", "link drop"), row("adaptive", 2.3, "x", "link drop"),
        row("none", 9.0, "1gbit", "evacuate 4 VMs"), row("adaptive", 4.0, "1gbit", "evacuate 4 VMs")]}
    found = {name.split(":")[0]: (figure, met) for name, figure, met in adaptive_targets(report)}
    assert found["unlimited"][1] is True and found["unlimited"][0].startswith("worst 1.04x")
    assert found["1gbit"][1] is False and found["1gbit"][0].startswith("worst 1.08x")
    assert found["10gbit"] == ("no data", None)
    assert found["link drops from unlimited to 1 Gbit/s half-way (1 GiB)"] == ("0.72x (2.3 / 3.2)", True)
    assert found["guest dirtying faster than 1 Gbit/s carries plain"] == ("no data", None)
    assert found["evacuating 4 VMs of 256 MiB over 1 Gbit/s"] == ("0.44x (4 / 9)", True)


def test_report_measures_deltas_against_the_same_method_without(monkeypatch):
    """Issue 15's targets from rows: each delta scenario's method against its -nodelta twin; the
    cache's peak against the default bound; a missing scenario is no data, not a pass."""
    monkeypatch.syspath_prepend(str(ROOT))
    from bench.report import delta_targets

    def row(method: str, seconds: float, scenario: str, **more) -> dict:
        return {**_old_row("1gbit", method, seconds), "size": "256M", "scenario": scenario, **more}

    inc = "increment, deltas"
    report = {"size": "256M", "references": {}, "results": [
        row("xenguest-nodelta", 3.0, inc, later_wire_bytes=40e6, downtime_seconds=0.30, cache_peak_bytes=0),
        row("xenguest", 2.0, inc, later_wire_bytes=1e6, downtime_seconds=0.20, cache_peak_bytes=270 << 20)]}
    found = {name.split(":")[0]: (figure, met) for name, figure, met in delta_targets(report)}
    assert found["increment guest, 256 MiB, 1 Gbit/s"] == ("0.03x (1e+06 / 4e+07)", True)
    assert found["increment guest"] == ("0.67x (0.2 / 0.3)", True)       # the downtime row, last of the name
    assert found["dirty"] == ("no data", None)
    assert found["delta cache never above its bound (256 MiB set for increment, the 64 MiB default for dirty), "
                 "by xenguest's figures"] == ("increment, deltas: peak 270.0 MiB", False)
