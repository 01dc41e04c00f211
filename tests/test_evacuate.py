"""`xenopsd-shim host-evacuate`: every running VM to the destination, one vm-migrate child each;
a VM that fails keeps running on the source, a signal cancels the children, nothing is left."""
from __future__ import annotations

import json
import os
import signal
import subprocess

import pytest

from conftest import HostDir, ProcessWatcher, argv_of, exe, wait_for
from test_faults import domain_state, procs

VMS = {"vm1": ("16M", "mixed"), "vm2": ("24M", "random"), "vm3": ("32M", "mixed")}


class ShimWatcher(ProcessWatcher):
    """Records the argv of every xenopsd-shim that runs meanwhile (the evacuation's children)."""
    NAMES = ("xenopsd-shim",)


def create_vms(host: HostDir, vms: dict[str, tuple[str, str]]) -> dict[str, list[str]]:
    """The VMs (workload none: their memory holds still), and each one's page digests."""
    for name, (memory, image) in vms.items():
        host.shim("vm-create", name, "--memory", memory, "--image", image)
    return {name: host.page_digests(name) for name in vms}


def running(host: HostDir) -> dict[str, str]:
    return {vm["name"]: vm["state"] for vm in host.vms()}


def test_three_vms_two_at_a_time_arrive_page_exact(hosts, receiver):
    a, b = hosts("A"), hosts("B")
    r = receiver(b)
    digests = create_vms(a, VMS)
    watcher = ShimWatcher()
    try:
        out = a.shim("host-evacuate", "--dest", r.address, "--parallel", "2", "--json")
    finally:
        seen = watcher.stop()
    report = json.loads(out.stdout)
    assert report["parallel"] == 2 and report["failed"] == [] and report["total_seconds"] > 0, report
    assert [(vm["vm"], vm["status"], vm["live"]) for vm in report["vms"]] == \
        [(name, "success", True) for name in VMS], report
    assert a.vms() == [] and running(b) == {name: "running" for name in VMS}
    for name, pages in digests.items():
        assert b.page_digests(name) == pages, name
    # A vm-migrate child per VM, with the parent's --root (a child's own children show its argv
    # between fork and exec: distinct argvs); progress: a line as each starts and ends.
    children = sorted({tuple(argv) for argv in argv_of(seen, a.root, "xenopsd-shim") if "vm-migrate" in argv})
    assert children == [("xenopsd-shim", "--root", str(a.root.resolve()), "vm-migrate", name, "--dest", r.address,
                         "--json") for name in sorted(VMS)], children
    lines = out.stderr.splitlines()
    assert [line for line in lines if ": migrating (" in line] == \
        [f"{name}: migrating ({i} of 3)" for i, name in enumerate(VMS, 1)], lines
    assert sorted(line.split(" in ")[0] for line in lines if ": migrated in " in line) == \
        [f"{name}: migrated" for name in VMS] and len(lines) == 6, lines


def test_a_failed_vm_keeps_running_on_the_source_and_the_others_complete(hosts, receiver):
    """The destination already has a VM named vm2 (another uuid): its migration is refused at
    synchronisation point 1, the other two migrate, and the line names vm2 and why."""
    a, b = hosts("A"), hosts("B")
    r = receiver(b)
    digests = create_vms(a, VMS)
    theirs = b.shim("vm-create", "vm2", "--memory", "16M").stdout.strip()
    out = a.shim("host-evacuate", "--dest", r.address, "--parallel", "2", check=False)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out
    errors = [line for line in out.stderr.splitlines() if line.startswith("xenopsd-shim: ")]
    assert errors == ["xenopsd-shim: VM vm2 not evacuated: migration failed: destination failed: a VM named "
                      "'vm2' already exists on this host; VM vm2 keeps running on this host"], out.stderr
    assert out.stdout.splitlines()[-1].startswith(f"evacuated 2 of 3 VMs to {r.address} in "), out.stdout
    assert running(a) == {"vm2": "running"} and a.page_digests("vm2") == digests["vm2"]
    assert running(b) == {"vm1": "running", "vm2": "running", "vm3": "running"}
    assert {vm["name"]: vm["uuid"] for vm in b.vms()}["vm2"] == theirs
    for name in ("vm1", "vm3"):
        assert b.page_digests(name) == digests[name], name
    wait_for(lambda: not procs(b, "emu-manager") and not procs(b, "xenguest"), what="B's emulators to exit")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["sigint", "sigterm"])
def test_a_signal_cancels_the_running_migration_and_starts_no_new_one(hosts, receiver, sig):
    """One at a time, capped at 10 MB/s: vm1 has arrived and vm2 is under way when the signal comes
    (to host-evacuate's process group, as Ctrl-C would). vm2 is cancelled and runs on the source,
    vm3 is never started, every VM runs on exactly one host, and no process is left."""
    a, b = hosts("A"), hosts("B")
    r = receiver(b)
    digests = create_vms(a, {"vm1": ("16M", "mixed"), "vm2": ("64M", "random"), "vm3": ("16M", "mixed")})
    evac = subprocess.Popen([exe("xenopsd-shim"), "host-evacuate", "--dest", r.address, "--parallel", "1",
                             "--max-bandwidth", "10MB/s", "--no-compress"], env=a.env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    wait_for(lambda: domain_state(b, "vm1") == "running" and domain_state(b, "vm2") is not None and
             procs(a, "xenguest"), timeout=120, what="vm1 on B and vm2's migration under way")
    os.killpg(evac.pid, sig)
    out, err = evac.communicate(timeout=180)
    assert evac.returncode == 128 + sig and "Traceback" not in err, (evac.returncode, err)
    errors = [line for line in err.splitlines() if line.startswith("xenopsd-shim: ")]
    assert errors == [f"xenopsd-shim: VM vm2 not evacuated: migration cancelled by {sig.name}; "
                      "VM vm2 keeps running on this host",
                      "xenopsd-shim: VM vm3 not evacuated: not started: the evacuation was cancelled",
                      f"xenopsd-shim: cancelled by {sig.name}"], err
    assert "vm3: migrating" not in err, err
    assert running(a) == {"vm2": "running", "vm3": "running"}
    wait_for(lambda: running(b) == {"vm1": "running"}, what="B to keep only vm1")
    for name, host in (("vm1", b), ("vm2", a), ("vm3", a)):
        assert host.page_digests(name) == digests[name], name
    assert [p.cmdline() for p in a.processes() if "vm-migrate" in p.cmdline()] == []


@pytest.mark.parametrize("value", ["0", "-1", "abc", ""])
def test_a_bad_parallel_is_one_line_and_moves_nothing(hosts, value):
    a = hosts("A")
    a.shim("vm-create", "vm1", "--memory", "16M")
    out = a.shim("host-evacuate", "--dest", "127.0.0.1:9", "--parallel", value, check=False)
    assert out.returncode == 2 and out.stdout == "", out
    assert out.stderr == f"xenopsd-shim: --parallel must be a whole number of at least 1, not {value!r}\n", out
    assert running(a) == {"vm1": "running"}
