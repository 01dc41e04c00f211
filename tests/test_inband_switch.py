"""In-band compression switched while a migration runs (vm-compress), and the adaptive policy.

Real processes: vm-migrate, paced so that it lasts seconds, and vm-compress from another process;
the switch travels through the migration's control socket, emu-manager and EMP to xenguest.
"""
from __future__ import annotations

import json
import subprocess
import time

from conftest import HostDir, exe, wait_for

from test_compression import configure


def start_migration(host: HostDir, dest: str, *flags: str) -> subprocess.Popen:
    return subprocess.Popen([exe("xenopsd-shim"), "vm-migrate", "vm1", "--dest", dest, "--json", *flags],
                            env=host.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def compress(host: HostDir, *argv: str) -> subprocess.CompletedProcess:
    return host.shim("vm-compress", "vm1", *argv, check=False)


def switch_when_sending(host: HostDir, *argv: str) -> subprocess.CompletedProcess:
    """vm-compress, retried while the migration has not reached its memory yet."""
    def answered() -> subprocess.CompletedProcess | None:
        proc = compress(host, *argv)
        return None if "not sending memory yet" in proc.stderr or "not migrating" in proc.stderr else proc
    return wait_for(answered, 60, "the migration to send memory")


def finish(proc: subprocess.Popen) -> dict:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    return json.loads(out)


def test_switch_on_then_off_mid_migration_page_exact(hosts, receiver):
    """A migration started without compression is switched on, then off: memory arrives exactly
    (--verify), and each pass's report shows batches compressed only while compression was on."""
    a, b = hosts("A"), hosts("B")
    r = receiver(b)
    a.shim("vm-create", "vm1", "--memory", "32M", "--image", "mixed", "--workload", "dirty:10MB/s")
    # Paced so that pass 0 alone takes seconds, compressed or not: both switches land in it or later.
    proc = start_migration(a, r.address, "--no-compress", "--verify", "--max-bandwidth", "4MB/s")
    on = switch_when_sending(a, "on", "--level", "3")
    assert on.returncode == 0, on.stderr
    assert on.stdout.startswith("VM vm1: in-band compression on (level 3) from pass ")
    time.sleep(1.0)
    off = compress(a, "off")
    assert off.returncode == 0, off.stderr
    summary = finish(proc)
    assert summary["mode"] == "none" and summary["verified"]
    assert [v["state"] for v in b.vms()] == ["running"] and a.vms() == []

    switches = summary["compression_switches"]
    assert [(s["mode"], s["by"]) for s in switches] == [("on", "command"), ("off", "command")]
    assert switches[0]["level"] == 3
    first_on, first_off = switches[0]["iteration"], switches[1]["iteration"]
    passes = summary["iteration_stats"]
    assert [p["iteration"] for p in passes] == list(range(len(passes)))
    assert sum(p["pages"] for p in passes) == summary["pages_sent"]
    for p in passes:
        if p["iteration"] < first_on or p["iteration"] > first_off:
            assert p["compressed_batches"] == 0, p
        if first_on < p["iteration"] < first_off:
            assert p["plain_batches"] == 0 and p["levels"] == [3], p
    assert sum(p["compressed_batches"] for p in passes) > 0
    assert passes[first_on]["mode"] in ("off", "on") and passes[-1]["mode"] == "off"


def test_switch_refused_where_it_cannot_apply(hosts, receiver):
    """Not migrating, a stream-method migration, a bad mode: one line each, non-zero exits; the
    refused migration goes on and completes."""
    a, b = hosts("A"), hosts("B")
    r = receiver(b)
    a.shim("vm-create", "vm1", "--memory", "32M", "--image", "mixed")
    idle = compress(a, "on")
    assert idle.returncode != 0 and idle.stderr.strip().splitlines()[-1] == "Error: VM vm1: it is not migrating"
    bad = compress(a, "fast")
    assert bad.returncode == 2 and "'fast' is not one of 'off', 'on', 'auto'" in bad.stderr and "Traceback" not in bad.stderr

    configure(a, "stream")
    proc = start_migration(a, r.address, "--compress", "--max-bandwidth", "8MB/s")
    refused = switch_when_sending(a, "on")
    assert refused.returncode != 0 and refused.stderr.strip().splitlines() == [
        "Error: VM vm1: the stream method compresses the whole stream outside xenguest: in-band compression "
        "cannot be switched"]
    summary = finish(proc)
    assert summary["mode"] == "stream" and summary["compression_switches"] == []


def test_adaptive_sends_incompressible_memory_plain(hosts, receiver):
    """adaptive on random memory: xenguest decides per batch and sends (almost) every batch plain,
    so the wire carries about the memory's size and the source compresses little."""
    a, b = hosts("A"), hosts("B")
    r = receiver(b)
    configure(a, "adaptive")
    a.shim("vm-create", "vm1", "--memory", "64M", "--image", "random")
    before = a.page_digests("vm1")
    watcher_argv = a.shim("vm-migrate", "vm1", "--dest", r.address, "--json", "--compress")
    summary = json.loads(watcher_argv.stdout)
    assert summary["mode"] == "adaptive" and summary["emu_manager_argv"][-2:] == ["-compress", "true"]
    assert b.page_digests("vm1") == before
    passes = summary["iteration_stats"]
    assert passes and all(p["mode"] == "auto" for p in passes)
    compressed = sum(p["compressed_batches"] for p in passes)
    plain = sum(p["plain_batches"] for p in passes)
    assert plain >= 4 * compressed and plain > 0
    assert summary["compression_switches"][0] == {"iteration": 0, "mode": "auto", "level":
                                                  summary["compression_switches"][0]["level"], "by": "policy"}
    assert summary["wire_bytes_per_stream"]["memory"] >= 64 << 20


def test_adaptive_turns_compression_on_when_precopy_does_not_converge(hosts, receiver):
    """A guest that dirties faster than the paced link carries: the policy sees the guest dirty
    nearly as many pages during a pass as the pass sent, and turns compression on for every batch."""
    a, b = hosts("A"), hosts("B")
    r = receiver(b)
    configure(a, "adaptive")
    a.shim("vm-create", "vm1", "--memory", "32M", "--image", "mixed", "--workload", "dirty:30MB/s")
    time.sleep(0.5)
    # emu-manager pauses after pass 3 here instead of 4 (its live-done rule), to keep the test short.
    proc = a.shim("vm-migrate", "vm1", "--dest", r.address, "--json", "--compress", "--verify",
                  "--max-bandwidth", "4MB/s", env={**a.env, "EMU_MANAGER_LIVE_ITERATIONS": "3"})
    summary = json.loads(proc.stdout)
    assert summary["verified"] and [v["state"] for v in b.vms()] == ["running"]
    by_policy = [s for s in summary["compression_switches"] if s["by"] == "policy"]
    assert [s["mode"] for s in by_policy] == ["auto", "on"], summary["compression_switches"]
    passes = summary["iteration_stats"]
    turned = by_policy[1]["iteration"]
    assert passes[turned - 1]["dirty"] >= 0.9 * passes[turned - 1]["pages"], passes
    assert all(p["mode"] == "on" for p in passes[turned + 1:])
    assert "pre-copy is not converging" in (a.root / "xenopsd.log").read_text()


def test_switch_on_refused_when_the_destination_takes_no_in_band_records(hosts, receiver):
    """A migration without compression asked nothing of its destination; switching in-band on
    asks then, and an older host (serve --no-in-band) makes it a refusal, not a failed migration."""
    a, b = hosts("A"), hosts("B")
    r = receiver(b, "--no-in-band")
    a.shim("vm-create", "vm1", "--memory", "32M", "--image", "mixed")
    before = a.page_digests("vm1")
    proc = start_migration(a, r.address, "--no-compress", "--max-bandwidth", "4MB/s")
    refused = switch_when_sending(a, "on")
    assert refused.returncode != 0 and refused.stderr.strip().splitlines() == [
        "Error: VM vm1: the destination does not accept in-band compressed records"]
    summary = finish(proc)
    assert summary["mode"] == "none" and summary["compression_switches"] == []
    assert b.page_digests("vm1") == before
