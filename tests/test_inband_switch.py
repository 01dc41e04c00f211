"""In-band compression switched while a migration runs (vm-compress), and the adaptive policy.

Real processes: vm-migrate, paced so that it lasts seconds, and vm-compress from another process;
the switch travels through the migration's control socket, emu-manager and EMP to xenguest.
"""
from __future__ import annotations

import json
import subprocess
import time

import pytest

from conftest import HostDir, exe, wait_for

from test_compression import configure
from xenopsd_shim import migctl


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


Mode = tuple[str, int | None]     # a mode and its level (None: the one in force)
WRITING = "dirty:10MB/s"     # faster than the paced link carries: pre-copy resends pages every pass
SWITCH_GAP = 2.0            # seconds between switches: as long as a 4 MiB batch takes at 2 MB/s
PACED = "2MB/s"             # so that the first pass of 32 MiB outlasts both switches, compressed or not


def switch_before_the_first_pass(host: HostDir, mode: str, level: int | None = None) -> str:
    """A switch on the control socket (vm-compress's request), retried at once while the
    migration has not reached its memory: emu-manager then holds it until xenguest's init
    stage, so it applies from pass 0's first batch. (xenguest encodes up to 2 x threads + 1
    batches ahead, all of a 32 MiB pass 0 with four threads: a switch that came later would
    show only in pass 1.)"""
    path = host.root / "run" / f"migration-control-{host.vms_by_name()['vm1']['domid']}"

    def answered() -> str | None:
        try:
            return migctl.request(path, mode, level, timeout=30)
        except migctl.ControlSocketError as e:
            if "not migrating" in str(e) or "not sending memory yet" in str(e):
                time.sleep(0.005)
                return None
            raise
    return wait_for(answered, 60, "the migration to take a switch")


def switched_while_writing(host: HostDir, first: Mode, switches: list[tuple[str, ...]]) -> list[str]:
    """`first` before pass 0, then vm-compress each of `switches` in turn, SWITCH_GAP apart,
    while the guest writes, then freeze the guest; the page digests its memory must arrive
    with. The guest starts writing once the migration sends memory: its Xenops record, sent
    first, says `none`, so the copy on the destination stays still and its digests can be
    compared."""
    assert switch_before_the_first_pass(host, *first).split()[2] == "0"
    host.xenemu("workload", "vm1", WRITING)
    for argv in switches:
        time.sleep(SWITCH_GAP)
        proc = compress(host, *argv)
        assert proc.returncode == 0, proc.stderr
    time.sleep(SWITCH_GAP / 2)
    host.xenemu("workload", "vm1", "none")
    return host.page_digests("vm1")


def assert_passes_follow(summary: dict, start: Mode, by_command: list[Mode]) -> None:
    """Each pass's report agrees with the switches: a pass no switch landed in ran wholly in the
    mode in force (off: no batch compressed; on: none plain, at the level in force) and reports
    it; the switches are recorded as vm-compress's, in order, from non-decreasing passes."""
    passes, switches = summary["iteration_stats"], summary["compression_switches"]
    assert [p["iteration"] for p in passes] == list(range(len(passes))) and len(passes) >= 2, passes
    assert sum(p["pages"] for p in passes) == summary["pages_sent"]
    commands = [s for s in switches if s["by"] == "command"]
    assert len(commands) == len(by_command) and all(
        s["mode"] == mode and level in (None, s["level"]) for s, (mode, level) in zip(commands, by_command)), switches
    assert [s["iteration"] for s in switches] == sorted(s["iteration"] for s in switches), switches
    for p in passes:
        before = [s for s in switches if s["iteration"] < p["iteration"]]
        mode, level = (before[-1]["mode"], before[-1]["level"]) if before else start
        landed = [s for s in switches if s["iteration"] == p["iteration"]]
        assert p["mode"] == (landed[-1]["mode"] if landed else mode), (p, switches)
        if landed:
            continue
        if mode == "off":
            assert p["compressed_batches"] == 0 and p["levels"] == [], (p, switches)
        elif mode == "on":
            assert p["plain_batches"] == 0 and p["levels"] in ([], [level]), (p, switches)


@pytest.mark.parametrize("threads", [1, 4])
def test_xenguest_method_switched_off_then_on_while_the_guest_writes(hosts, receiver, threads):
    """Compression on from the start (xenguest method), switched off, then on at another level,
    while the guest writes: page-exact (--verify, and the digests on the destination), the
    passes' reports show the plain stretch and the level, with one and with four threads."""
    a, b = hosts("A"), hosts("B")
    r = receiver(b)
    configure(a, "xenguest")
    a.env["XENGUEST_COMPRESS_THREADS"] = str(threads)
    a.shim("vm-create", "vm1", "--memory", "32M", "--image", "mixed")
    proc = start_migration(a, r.address, "--compress", "--verify", "--max-bandwidth", PACED)
    frozen = switched_while_writing(a, ("off", None), [("on", "--level", "5")])
    summary = finish(proc)
    assert summary["mode"] == "xenguest" and summary["verified"] and summary["emu_manager_argv"][-4:-2] == \
        ["-compress", "true"]
    assert [v["state"] for v in b.vms()] == ["running"] and a.vms() == [] and b.page_digests("vm1") == frozen
    assert_passes_follow(summary, ("on", None), [("off", None), ("on", 5)])
    # Off from pass 0's first batch; on again from the batches encoded after it, which with four
    # threads (a window of 2 x 4 + 1 batches: all of pass 0) are the next pass's.
    passes = summary["iteration_stats"]
    assert passes[0]["plain_batches"] > 0 and sum(p["compressed_batches"] for p in passes) > 0, passes
    assert any(p["levels"] == [5] for p in passes) and passes[-1]["mode"] == "on", passes


def test_adaptive_method_forced_on_then_off_while_the_guest_writes(hosts, receiver):
    """adaptive starts in auto (the policy's switch); vm-compress forces on at level 7, then off,
    while the guest writes: page-exact, and the reports show the level-7 batches and the plain end."""
    a, b = hosts("A"), hosts("B")
    r = receiver(b)
    configure(a, "adaptive")
    a.shim("vm-create", "vm1", "--memory", "32M", "--image", "mixed")
    proc = start_migration(a, r.address, "--compress", "--verify", "--max-bandwidth", PACED)
    frozen = switched_while_writing(a, ("on", 7), [("off",)])
    summary = finish(proc)
    assert summary["mode"] == "adaptive" and summary["verified"]
    assert [v["state"] for v in b.vms()] == ["running"] and a.vms() == [] and b.page_digests("vm1") == frozen
    switches = summary["compression_switches"]
    assert (switches[0]["mode"], switches[0]["by"], switches[0]["iteration"]) == ("auto", "policy", 0), switches
    assert_passes_follow(summary, ("auto", None), [("on", 7), ("off", None)])
    passes = summary["iteration_stats"]
    assert any(7 in p["levels"] for p in passes) and sum(p["compressed_batches"] for p in passes) > 0, passes
    assert passes[-1]["mode"] == "off" and passes[-1]["compressed_batches"] == 0, passes


@pytest.mark.slow
def test_back_and_forth_with_a_switch_in_each_run(hosts, receiver):
    """The same VM migrated A -> B -> A -> B -> A with the xenguest method, switched off and
    on again in each run while its guest writes: page-exact every time, each run's switches its own."""
    a, b = hosts("A"), hosts("B")
    serves = {a: receiver(a), b: receiver(b)}
    for h in (a, b):
        configure(h, "xenguest")
    a.shim("vm-create", "vm1", "--memory", "16M", "--image", "mixed")
    src, dst = a, b
    for run in range(4):
        # 16 MiB at 1.5 MB/s: the first pass outlasts the switches as 32 MiB at PACED does
        proc = start_migration(src, serves[dst].address, "--compress", "--verify", "--max-bandwidth", "1500KB/s")
        level = str(1 + run % 3)
        frozen = switched_while_writing(src, ("off", None), [("on", "--level", level)])
        summary = finish(proc)
        assert summary["verified"] and dst.page_digests("vm1") == frozen, f"run {run}"
        assert src.vms() == [] and [v["state"] for v in dst.vms()] == ["running"], f"run {run}"
        assert_passes_follow(summary, ("on", None), [("off", None), ("on", int(level))])
        src, dst = dst, src


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
    """adaptive on random memory: xenguest decides per batch and sends every batch plain, so the
    wire carries about the memory's size, and it spends little CPU finding that out: zstd sees a
    few batches only (a batch of random pages would go plain even compressed, so the batches
    alone cannot tell; neither can the CPU seconds, as zstd gives up on random data quickly)."""
    a, b = hosts("A"), hosts("B")
    r = receiver(b)
    configure(a, "adaptive")
    a.env["XENGUEST_COMPRESS_THREADS"] = "2"    # the first two batches are compressed at once, before any ratio
    a.shim("vm-create", "vm1", "--memory", "64M", "--image", "random")
    before = a.page_digests("vm1")
    watcher_argv = a.shim("vm-migrate", "vm1", "--dest", r.address, "--json", "--compress")
    summary = json.loads(watcher_argv.stdout)
    assert summary["mode"] == "adaptive" and summary["emu_manager_argv"][-4:-2] == ["-compress", "true"]
    assert b.page_digests("vm1") == before
    passes = summary["iteration_stats"]
    assert passes and all(p["mode"] == "auto" for p in passes)
    assert sum(p["compressed_batches"] for p in passes) == 0 and sum(p["plain_batches"] for p in passes) >= 16
    assert sum(p["compress_pages"] for p in passes) <= summary["pages_sent"] // 4, passes
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
