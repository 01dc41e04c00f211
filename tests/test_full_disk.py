"""A full disk under a host or a suspend image: one clear error, never a SIGBUS.

Each case puts a host directory (or an image file) on a small tmpfs, so the
disk fills for real; the VM must keep running where it was, nothing
half-made may stay behind, and `serve` must live on to take a VM that fits.
"""
from __future__ import annotations

import errno
import json
import os
import subprocess
import time
import uuid as uuidlib
from pathlib import Path
from typing import Callable, Iterator

import pytest

from conftest import HostDir, Receiver
from xenmig import image

NO_SPACE = os.strerror(errno.ENOSPC)
SIGBUS_CODES = (128 + 7, -7)


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Callable[[str, str], Path]]:
    """Mount a tmpfs of a given size at tmp_path/NAME (as root); unmounted at teardown.

    Ask for it before `hosts` and `receiver`, so it is unmounted after they have cleaned up."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs to fill a disk needs root")
    mounted: list[Path] = []

    def mount(name: str, size: str) -> Path:
        point = tmp_path / name
        point.mkdir(parents=True, exist_ok=True)
        out = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point)],
                             capture_output=True, text=True, check=False)
        if out.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs: {out.stderr.strip()}")
        mounted.append(point)
        return point

    yield mount
    for point in reversed(mounted):
        subprocess.run(["umount", "-l", str(point)], check=False)


def one_line_error(proc: subprocess.CompletedProcess, code: int = 2) -> str:
    assert proc.returncode not in SIGBUS_CODES, proc.stderr
    assert proc.returncode == code and len(proc.stderr.strip().splitlines()) == 1, \
        (proc.returncode, proc.stderr)
    return proc.stderr


def fill(directory: Path) -> Path:
    """A file that takes every free byte of `directory`'s filesystem."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for chunk in (1 << 20, 4096):
            while True:
                try:
                    os.write(fd, b"\xff" * chunk)
                except OSError as e:
                    assert e.errno == errno.ENOSPC
                    break
    finally:
        os.close(fd)
    return filler


def old_half_made_domain(host: HostDir, domid: int, name: str, memory_bytes: int) -> None:
    """A domain as a receiver before space reservation left it when it died mid-restore:
    sparse files (made by ftruncate) in state `building`."""
    directory = host.root / "domains" / str(domid)
    (directory / "ctx").mkdir(parents=True)
    for fname, size in (("memory", memory_bytes), ("dirty", memory_bytes // 4096), ("ctl", 4096)):
        (directory / fname).touch(mode=0o600)
        os.truncate(directory / fname, size)
    meta = {"domid": domid, "uuid": str(uuidlib.uuid4()), "name": name, "memory_bytes": memory_bytes,
            "state": "building", "workload": "none", "workload_pid": None, "vgpu_bytes": 0}
    (directory / "meta.json").write_text(json.dumps(meta))
    (host.root / "next-domid").write_text(str(domid + 1))


def configure(host: HostDir, compressor: str) -> None:
    (host.root / "xenopsd.conf").write_text(f"migration-compressor = {compressor}\n")


def assert_serves_a_vm_that_fits(a: HostDir, b: HostDir, r: Receiver) -> None:
    assert r.proc.poll() is None, f"serve exited {r.proc.returncode}: {r.log[-2000:]}"
    a.shim("vm-create", "small", "--memory", "16M")
    a.shim("vm-migrate", "small", "--dest", r.address, "--no-compress")
    assert [(v["name"], v["state"]) for v in b.vms()] == [("small", "running")]


def test_migration_into_a_full_destination(tmpfs, hosts, receiver):
    """By every method, the destination refuses before any page arrives; the source quotes its
    reason and keeps the VM. With a vGPU, memory alone would fit: its reservation counts too."""
    disk = tmpfs("B", "64m")
    a, b = hosts("A"), hosts("B")
    r = receiver(b)
    a.shim("vm-create", "vm1", "--memory", "128M")
    a.shim("vm-create", "gpu", "--memory", "32M", "--vgpu", "48M")
    before = {name: a.shim("vm-digest", name).stdout for name in ("vm1", "gpu")}
    for name, compressor, flag in (("vm1", "stream", "--no-compress"), ("vm1", "stream", "--compress"),
                                   ("vm1", "xenguest", "--compress"), ("gpu", "stream", "--no-compress")):
        configure(a, compressor)
        err = one_line_error(a.shim("vm-migrate", name, "--dest", r.address, flag, check=False))
        assert f"destination failed: cannot create domain for VM '{name}': {NO_SPACE}" in err, err
        assert f"VM {name} keeps running on this host" in err, err
        assert [v["state"] for v in a.vms()] == ["running", "running"]
        assert a.shim("vm-digest", name).stdout == before[name]
        assert list((disk / "domains").iterdir()) == []       # no half-made domain left
        assert r.proc.poll() is None, f"serve exited {r.proc.returncode}: {r.log[-2000:]}"
    for name in ("vm1", "gpu"):
        a.shim("vm-destroy", name)
    assert_serves_a_vm_that_fits(a, b, r)


def test_old_sparse_half_made_domain_on_a_full_disk(tmpfs, hosts, receiver, tmp_path):
    """Leftovers of a receiver that died before space was reserved (sparse files, a full disk):
    vm-resume, xenemu unpause, vm-destroy and a restarted serve each fail cleanly or succeed,
    never by SIGBUS."""
    disk = tmpfs("B", "64m")
    a, b = hosts("A"), hosts("B")
    old_half_made_domain(b, 1, "old1", 128 << 20)
    old_half_made_domain(b, 2, "old2", 128 << 20)
    unfinished = disk / "domains" / "3"                # its creator was killed before meta.json
    unfinished.mkdir()
    (unfinished / "memory").write_bytes(b"\xff" * (8 << 20))
    filler = fill(disk)
    a.shim("vm-create", "vm1", "--memory", "16M")
    a.shim("vm-suspend", "vm1", "--to", str(tmp_path / "vm1.img"))

    err = one_line_error(b.shim("vm-resume", str(tmp_path / "vm1.img"), check=False))
    assert f"cannot create domain for VM 'vm1': {NO_SPACE}" in err, err
    err = one_line_error(b.run("xenemu", "unpause", "old1", check=False), code=1)
    assert NO_SPACE in err, err
    assert sorted(v["name"] for v in b.vms()) == ["old1", "old2"]

    b.shim("vm-destroy", "old1")                       # maps nothing: the disk is still full
    assert [v["name"] for v in b.vms()] == ["old2"]
    r = receiver(b)                                    # destroys old2, half-restored, before it serves
    deadline = time.monotonic() + 30
    while (disk / "domains" / "2").exists() and r.proc.poll() is None:    # still on a full disk
        assert time.monotonic() < deadline, r.log
        time.sleep(0.05)
    filler.unlink()
    assert_serves_a_vm_that_fits(a, b, r)
    assert "destroying domain 2 (VM old2), left half-restored" in r.log
    assert f"removed {unfinished}, a domain whose creation never finished" in r.log
    assert len(list((disk / "domains").iterdir())) == 1


def test_vm_create_on_a_full_disk_and_past_the_limit(tmpfs, hosts, tmp_path):
    """Too big for the disk, or for the one limit that vm-create, xenemu create and a received
    Xenops record share."""
    disk = tmpfs("A", "64m")
    a = hosts("A")
    err = one_line_error(a.shim("vm-create", "vm1", "--memory", "128M", check=False))
    assert f"cannot create domain for VM 'vm1': {NO_SPACE}" in err and "free in" in err, err
    for argv, code in ((["xenopsd-shim", "vm-create", "vm1", "--memory", "1T"], 2),
                       (["xenemu", "create", "vm1", "--memory", "65G"], 1)):
        err = one_line_error(a.run(*argv, check=False), code=code)
        assert "invalid memory size" in err and "at most 64.0 GiB" in err, err
    meta = json.dumps({"name": "vm1", "uuid": str(uuidlib.uuid4()), "memory_bytes": 2 ** 1100})
    record = image.build_xenops_record(image.XenopsRecord(image.now(), image.WORD_SIZE, vm_str=meta))
    (tmp_path / "huge.img").write_bytes(image.SIGNATURE + image.build_header(image.XENOPS, len(record)) + record)
    err = one_line_error(a.shim("vm-resume", str(tmp_path / "huge.img"), check=False))
    assert "Xenops record's vm_str has an invalid memory size" in err and "at most 64.0 GiB" in err, err
    assert list((disk / "domains").iterdir()) == []
    a.shim("vm-create", "vm1", "--memory", "32M")
    assert [v["state"] for v in a.vms()] == ["running"]


def test_suspend_to_a_full_disk_says_no_space(tmpfs, hosts):
    """In stream mode zstd's ENOSPC is the cause; the EPIPE its writer then gets only its echo."""
    disk = tmpfs("F", "4m")
    a = hosts("A")
    configure(a, "stream")
    a.shim("vm-create", "vm1", "--memory", "16M", "--image", "random")
    before = a.shim("vm-digest", "vm1").stdout
    for flags in (["--compress"], []):
        err = one_line_error(a.shim("vm-suspend", "vm1", "--to", str(disk / "vm1.img"), *flags, check=False))
        assert NO_SPACE in err and "Broken pipe" not in err, (flags, err)
        assert list(disk.iterdir()) == []
        assert [v["state"] for v in a.vms()] == ["running"] and a.shim("vm-digest", "vm1").stdout == before
