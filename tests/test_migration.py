"""End to end: xenopsd-shim -> emu-manager -> xenguest on two emulated hosts over TCP."""
from __future__ import annotations

import json
import re
import time

from conftest import HostDir, ProcessWatcher, argv_of


def vm_create(host: HostDir, name: str, memory: str, workload: str = "none", image: str = "mixed") -> str:
    return host.shim("vm-create", name, "--memory", memory, "--image", image, "--workload", workload).stdout.strip()


def transcript(host: HostDir) -> list[str]:
    """The control-pipe messages the host's toolstack exchanged with emu-manager, in order."""
    log = (host.root / "xenopsd.log").read_text()
    return [m.group(1) + " " + m.group(2) for m in re.finditer(r" (->|<-) emu-manager: (.*)", log)]


def pages(host: HostDir, name: str) -> list[str]:
    return host.shim("vm-digest", name, "--pages").stdout.split("\n")


def test_live_migration_page_exact_with_real_process_tree(hosts, receiver):
    a, b = hosts("A"), hosts("B")
    r = receiver(b)
    uuid = vm_create(a, "vm1", "256M", workload="increment")
    time.sleep(0.3)
    watcher = ProcessWatcher()
    out = a.shim("vm-migrate", "vm1", "--dest", r.address, "--verify", "--json")
    seen = watcher.stop()
    summary = json.loads(out.stdout)
    assert summary["status"] == "success" and summary["mode"] == "none" and summary["iterations"] >= 2
    assert summary["memory_bytes"] == 256 << 20 and summary["wire_bytes"] > 256 << 20
    assert summary["downtime_seconds"] < summary["total_seconds"]
    assert set(summary["cpu_seconds"]["source"]) >= {"xenopsd-shim", "emu-manager", "xenguest"}
    assert a.vms() == []
    [vm] = b.vms()
    assert vm["uuid"] == uuid and vm["state"] == "running" and vm["workload"] == "increment"

    # The process tree, as a toolstack engineer would see it in ps.
    [src_emu] = argv_of(seen, a.root, "emu-manager")
    [dst_emu] = argv_of(seen, b.root, "emu-manager")
    assert src_emu[:3] == ["emu-manager", "-controloutfd", src_emu[2]] and src_emu[3] == "-controlinfd"
    assert src_emu[5:] == ["-fd", src_emu[6], "-mode", "hvm_save", "-domid", "1", "-live", "true", "-dm", "qemu"]
    assert dst_emu[5:] == ["-fd", dst_emu[6], "-mode", "hvm_restore", "-domid", "1",
                           "-store_port", "1", "-console_port", "2", "-dm", "qemu"]
    for root in (a.root, b.root):
        assert argv_of(seen, root, "xenguest") == [["xenguest", "-debug", "-domid", "1", "-controloutfd", "2",
                                                    "-controlinfd", "0", "-mode", "listen"]]
    assert not argv_of(seen, a.root, "zstd") and not argv_of(seen, b.root, "zstd")

    # The control-pipe transcripts follow DESIGN's sequences.
    src = transcript(a)
    infos = [int(x.rsplit("b", 1)[1]) for x in src if x.startswith("<- info:\\b\\b\\b\\b")]
    assert infos == sorted(infos) and infos[-1] == 100
    assert [x for x in src if "info:" not in x] == ["<- prepare:xenguest", "-> done", "<- suspend:", "-> done",
                                                    "<- result:0 0"]
    dst = [x for x in transcript(b) if "info:" not in x]
    assert dst[0] == "-> restore:xenguest" and re.fullmatch(r"<- result:xenguest \d+ \d+", dst[1]) and len(dst) == 2


def test_migration_with_workload_none_is_page_exact(hosts, receiver):
    a, b = hosts("A"), hosts("B")
    r = receiver(b)
    vm_create(a, "vm1", "128M", image="mixed")
    before = pages(a, "vm1")
    a.shim("vm-migrate", "vm1", "--dest", r.address, "--non-live")
    assert pages(b, "vm1") == before


def test_suspend_resume_on_another_host(hosts, tmp_path):
    a, b = hosts("A"), hosts("B")
    vm_create(a, "vm1", "128M", image="mixed")
    before = pages(a, "vm1")
    ctx_before = a.context_digests("vm1")
    image = tmp_path / "vm1.img"
    a.shim("vm-suspend", "vm1", "--to", str(image))
    assert a.vms() == []
    assert image.read_bytes()[:15] == b"XenSavedDomv2-\n"
    uuid = b.shim("vm-resume", str(image), "--name", "vm1-resumed").stdout.strip()
    [vm] = b.vms()
    assert vm["uuid"] == uuid and vm["name"] == "vm1-resumed" and vm["state"] == "running"
    assert pages(b, "vm1-resumed") == before
    assert b.context_digests("vm1-resumed") == ctx_before        # device model state included


def test_receiver_survives_and_accepts_after_failure(hosts, receiver):
    a, b = hosts("A"), hosts("B")
    r = receiver(b)
    vm_create(a, "vm1", "64M")
    vm_create(b, "vm1", "16M")                 # a different VM of the same name: destination refuses
    proc = a.shim("vm-migrate", "vm1", "--dest", r.address, check=False)
    assert proc.returncode == 2 and "already exists" in proc.stderr and len(proc.stderr.splitlines()) == 1
    assert [v["state"] for v in a.vms()] == ["running"]
    b.shim("vm-destroy", "vm1")
    a.shim("vm-migrate", "vm1", "--dest", r.address)
    assert a.vms() == [] and [v["state"] for v in b.vms()] == ["running"]


def test_unreachable_destination(hosts):
    a = hosts("A")
    vm_create(a, "vm1", "16M")
    proc = a.shim("vm-migrate", "vm1", "--dest", "127.0.0.1:1", check=False)
    assert proc.returncode == 2 and "cannot connect" in proc.stderr and len(proc.stderr.splitlines()) == 1
    assert [v["state"] for v in a.vms()] == ["running"]


def test_host_leaves_no_files_behind(hosts, receiver):
    a, b = hosts("A"), hosts("B")
    r = receiver(b)
    vm_create(a, "vm1", "32M")
    a.shim("vm-migrate", "vm1", "--dest", r.address)
    b.shim("vm-destroy", "vm1")
    for h in (a, b):
        left = sorted(p.name for p in h.root.iterdir())
        assert left == [".lock", "domains", "next-domid", "run", "xenopsd.log"], left
        assert list((h.root / "domains").iterdir()) == []
    assert list((a.root / "run").iterdir()) == []
    assert [p.name for p in (b.root / "run").iterdir()] == ["serve-address"]     # only while serving
    r.stop()
    assert list((b.root / "run").iterdir()) == []
