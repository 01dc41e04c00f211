"""The toolstack's command line against hostile input and rude endings: one line, nothing left."""
from __future__ import annotations

import os
import signal
import subprocess

from conftest import exe
from test_faults import domain_state, procs, shim, vms, wait_for


def test_vm_create_cancelled_by_sigterm_leaves_nothing(hosts, tmp_path):
    """A service manager stopping `vm-create` mid-build: no `building` domain, no process. The
    memory image is a FIFO nobody writes, so the build is still going whenever the signal lands."""
    a = hosts("A")
    fifo = tmp_path / "image.fifo"
    os.mkfifo(fifo)
    create = subprocess.Popen([exe("xenopsd-shim"), "vm-create", "big", "--memory", "256M", "--image", str(fifo),
                               "--workload", "increment"], env=a.env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    wait_for(lambda: domain_state(a, "big") == "building", what="the domain to be building")
    create.send_signal(signal.SIGTERM)
    out, err = create.communicate(timeout=60)
    assert create.returncode == 128 + signal.SIGTERM and out == "", (create.returncode, out, err)
    assert err.strip() == "xenopsd-shim: cancelled by SIGTERM", err
    assert vms(a) == [] and list((a.root / "domains").iterdir()) == [] and procs(a, "workload") == []


def test_vm_resume_of_a_uuid_already_on_the_host_is_refused(hosts, tmp_path):
    """Resuming the same image twice (under its own name or another) would run one VM twice."""
    a = hosts("A")
    shim(a, "vm-create", "vm1", "--memory", "16M")
    image = tmp_path / "vm1.img"
    shim(a, "vm-suspend", "vm1", "--to", str(image))
    uuid = shim(a, "vm-resume", str(image)).stdout.strip()
    for again in ([], ["--name", "vm1-again"]):
        out = shim(a, "vm-resume", str(image), *again, check=False)
        assert out.returncode == 2 and out.stdout == "" and "Traceback" not in out.stderr, out
        assert out.stderr == f"xenopsd-shim: VM {uuid} already exists on this host, as domain 2 (vm1, running)\n"
        assert [(v["uuid"], v["name"], v["state"]) for v in vms(a)] == [(uuid, "vm1", "running")]
    assert procs(a, "emu-manager") == [] and procs(a, "xenguest") == []


def test_migration_to_a_host_already_running_the_uuid_is_refused(hosts, receiver, tmp_path):
    """The same VM resumed on two hosts (one image, one uuid): migrating one copy onto the other's
    host is refused at the Xenops record, and each host keeps exactly its one running copy."""
    a, b = hosts("A"), hosts("B")
    r = receiver(b)
    shim(a, "vm-create", "vm1", "--memory", "32M", "--image", "random")
    image = tmp_path / "vm1.img"
    shim(a, "vm-suspend", "vm1", "--to", str(image))
    uuid = shim(a, "vm-resume", str(image)).stdout.strip()
    shim(b, "vm-resume", str(image), "--name", "vm1-on-b")
    before = shim(a, "vm-digest", "vm1").stdout
    mig = shim(a, "vm-migrate", "vm1", "--dest", r.address, check=False)
    assert mig.returncode == 2 and len(mig.stderr.splitlines()) == 1 and "Traceback" not in mig.stderr, mig
    assert f"destination failed: restore failed: VM {uuid} already exists on this host, as domain 1 " \
        "(vm1-on-b, running); VM vm1 keeps running on this host" in mig.stderr, mig.stderr
    assert [(v["uuid"], v["state"]) for v in vms(a)] == [(uuid, "running")]
    assert shim(a, "vm-digest", "vm1").stdout == before
    assert [(v["uuid"], v["name"], v["state"]) for v in vms(b)] == [(uuid, "vm1-on-b", "running")]
    wait_for(lambda: not procs(b, "emu-manager") and not procs(b, "xenguest"), what="B's emulators to exit")


def test_migration_to_its_own_host_still_shares_the_uuid(hosts, receiver):
    """A localhost migration restores a second copy beside the source's until the commit."""
    a = hosts("A")
    r = receiver(a)
    uuid = shim(a, "vm-create", "vm1", "--memory", "16M").stdout.strip()
    shim(a, "vm-migrate", "vm1", "--dest", r.address)
    assert [(v["uuid"], v["state"], v["domid"]) for v in vms(a)] == [(uuid, "running", 2)]
