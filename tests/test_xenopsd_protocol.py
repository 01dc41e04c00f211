"""xenopsd to xenopsd: the project against a reference peer written from xenops_server.ml.

The peer (refpeer.py) migrates a suspend image into `serve`, receives one from `vm-migrate`
(resumed on a third host and checked page by page against the source at the pause point),
and refuses a VM at synchronisation point 1, which must fail the migration before pre-copy.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import refpeer
from conftest import HostDir, ProcessWatcher, argv_of
from xenemu import Host
from test_migration import pages, vm_create


def metadata(vm: dict) -> str:
    """What our vm_metadata cookie carries (our substitute for VM.import_metadata)."""
    return json.dumps({k: vm[k] for k in ("name", "uuid", "memory_bytes", "workload")} | {"vgpu_bytes": 0})


def suspended(host: HostDir, tmp_path: Path) -> tuple[dict, list[str], Path]:
    """A VM suspended to a file on `host`: its record, its pages, the image."""
    vm_create(host, "vm1", "16M", image="mixed")
    [vm] = host.vms()
    before = pages(host, "vm1")
    image = tmp_path / "vm1.img"
    host.shim("vm-suspend", "vm1", "--to", str(image))
    return vm, before, image


def addr(address: str) -> tuple[str, int]:
    host, port = address.rsplit(":", 1)
    return host, int(port)


@pytest.mark.parametrize("legacy", [False, True], ids=["migrate-routes", "legacy-memory-route"])
def test_reference_sender_migrates_into_serve(hosts, receiver, tmp_path, legacy):
    a, b = hosts("A"), hosts("B")
    r = receiver(b)
    vm, before, image = suspended(a, tmp_path)
    cookies = {"memory_limit": str(vm["memory_bytes"]), "vm_metadata": metadata(vm)}
    log = refpeer.send_vm(addr(r.address), vm["uuid"], image, cookies, legacy=legacy)
    handshake = ["point 1: Success"] + ([] if legacy else ["point 1-mem: Success", "point 1-mem ACK"])
    assert log == handshake + ["point 2", "point 3", "point 4: Success"]
    [moved] = b.vms()
    assert moved["uuid"] == vm["uuid"] and moved["name"] == "vm1" and moved["state"] == "running"
    assert pages(b, "vm1") == before
    assert "synchronisation point 1: domain" in r.log


def test_serve_refuses_at_point_1_without_memory_limit_or_metadata(hosts, receiver, tmp_path):
    a, b = hosts("A"), hosts("B")
    r = receiver(b)
    vm, _, image = suspended(a, tmp_path)
    for cookies, why in (({"vm_metadata": metadata(vm)}, "no cookie memory_limit"),
                         ({"memory_limit": str(vm["memory_bytes"])}, "no vm_metadata cookie")):
        with pytest.raises(refpeer.PeerError, match="point 1: .*Internal_error.*" + why):
            refpeer.send_vm(addr(r.address), vm["uuid"], image, cookies)
    b.shim("vm-list")          # the host still answers
    assert b.vms() == []


def test_vm_migrate_to_reference_receiver(hosts, tmp_path):
    a, c = hosts("A"), hosts("C")
    uuid = vm_create(a, "vm1", "16M", workload="dirty:5MB/s")
    # The guest writes through pre-copy, but its record says `none`: the copy resumed on C then
    # holds still for its digest (a running workload there would change pages meanwhile).
    Host(a.root).find("vm1").update(workload="none")
    at_pause: dict = {}

    def point_3() -> None:                  # the source's all-clear: its copy is paused, complete
        [at_pause["vm"]] = a.vms()
        at_pause["pages"] = pages(a, "vm1")

    store = tmp_path / "received.img"
    peer = refpeer.Receiver(store, at_point_3=point_3)
    try:
        time.sleep(0.3)
        a.shim("vm-migrate", "vm1", "--dest", peer.address, "--no-compress")
    finally:
        peer.close()
    assert peer.error is None, peer.error
    assert peer.log == ["sent point 1", "sent point 1-mem", "got point 1-mem ACK", "point 2", "got point 3",
                        "sent point 4"]
    dest_id = uuid[:24] + "000000000001"
    vm_cookies, mem_cookies = peer.cookies["vm"], peer.cookies["mem"]
    common = {"instance_id", "final_id", "dbg", "mem_migration"}
    assert vm_cookies["final_id"] == mem_cookies["final_id"] == uuid and "compress" not in vm_cookies
    assert set(mem_cookies) == common and vm_cookies["memory_limit"] == str(16 << 20)
    assert set(vm_cookies) == common | {"memory_limit", "memory_total_source", "vm_metadata", "xenmig_extensions"}
    assert at_pause["vm"]["state"] == "paused" and a.vms() == []
    assert dest_id != uuid
    # The image it stored resumes elsewhere, every page as it was at the pause point.
    assert c.shim("vm-resume", str(store)).stdout.strip() == uuid
    assert pages(c, "vm1") == at_pause["pages"]


def test_refusal_at_point_1_fails_before_precopy(hosts, receiver, tmp_path):
    """A destination that cannot take the VM says so before emu-manager ever runs on the source."""
    a, b = hosts("A"), hosts("B")
    vm_create(a, "vm1", "16M", workload="dirty:5MB/s")
    vm_create(b, "vm1", "8M")                                # a name clash on our serve
    r = receiver(b)
    peer = refpeer.Receiver(tmp_path / "never.img", refuse="not enough free memory")
    plain = refpeer.Receiver(tmp_path / "unverified.img")      # takes the VM, announces no extension
    watcher = ProcessWatcher()
    try:
        real = a.shim("vm-migrate", "vm1", "--dest", peer.address, check=False)
        ours = a.shim("vm-migrate", "vm1", "--dest", r.address, check=False)
        verify = a.shim("vm-migrate", "vm1", "--dest", plain.address, "--verify", check=False)
    finally:
        seen = watcher.stop()
        peer.close()
        plain.close()
    assert real.returncode != 0 and ours.returncode != 0
    assert real.stderr.strip() == ("xenopsd-shim: migration failed: destination failed: not enough free memory; "
                                   "VM vm1 keeps running on this host"), real.stderr
    assert "destination failed: a VM named 'vm1' already exists on this host; VM vm1 keeps running on this host" \
        in ours.stderr and len(ours.stderr.strip().splitlines()) == 1, ours.stderr
    assert verify.returncode != 0 and "the destination cannot verify memory (--verify): it did not announce it; " \
        "VM vm1 keeps running on this host" in verify.stderr, verify.stderr
    assert peer.log == ["sent point 1: Error"] and not (tmp_path / "never.img").exists()
    assert plain.log == ["sent point 1"] and not (tmp_path / "unverified.img").exists()
    assert not argv_of(seen, a.root, "emu-manager") and not argv_of(seen, a.root, "xenguest")
    assert not argv_of(seen, b.root, "emu-manager")
    [vm] = a.vms()
    assert vm["state"] == "running"
    assert [d["name"] for d in b.vms()] == ["vm1"] and b.vms()[0]["memory_bytes"] == 8 << 20
