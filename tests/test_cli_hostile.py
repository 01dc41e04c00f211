"""The toolstack's command line against hostile input and rude endings: one line, nothing left."""
from __future__ import annotations

import os
import signal
import subprocess

import pytest

from conftest import exe, wait_for
from test_faults import domain_state, procs


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
    assert err == "xenopsd-shim: cancelled by SIGTERM\n", err
    assert a.vms() == [] and list((a.root / "domains").iterdir()) == [] and procs(a, "workload") == []


def test_vm_resume_of_a_uuid_already_on_the_host_is_refused(hosts, tmp_path):
    """Resuming the same image twice (under its own name or another) would run one VM twice."""
    a = hosts("A")
    a.shim("vm-create", "vm1", "--memory", "16M")
    image = tmp_path / "vm1.img"
    a.shim("vm-suspend", "vm1", "--to", str(image))
    uuid = a.shim("vm-resume", str(image)).stdout.strip()
    for again in ([], ["--name", "vm1-again"]):
        out = a.shim("vm-resume", str(image), *again, check=False)
        assert out.returncode == 2 and out.stdout == "" and "Traceback" not in out.stderr, out
        assert out.stderr == f"xenopsd-shim: VM {uuid} already exists on this host, as domain 2 (vm1, running)\n"
        assert [(v["uuid"], v["name"], v["state"]) for v in a.vms()] == [(uuid, "vm1", "running")]
    assert procs(a, "emu-manager") == [] and procs(a, "xenguest") == []


def test_migration_to_a_host_already_running_the_uuid_is_refused(hosts, receiver, tmp_path):
    """The same VM resumed on two hosts (one image, one uuid): migrating one copy onto the other's
    host is refused at synchronisation point 1, and each host keeps exactly its one running copy."""
    a, b = hosts("A"), hosts("B")
    r = receiver(b)
    a.shim("vm-create", "vm1", "--memory", "32M", "--image", "random")
    image = tmp_path / "vm1.img"
    a.shim("vm-suspend", "vm1", "--to", str(image))
    uuid = a.shim("vm-resume", str(image)).stdout.strip()
    b.shim("vm-resume", str(image), "--name", "vm1-on-b")
    before = a.shim("vm-digest", "vm1").stdout
    mig = a.shim("vm-migrate", "vm1", "--dest", r.address, check=False)
    assert mig.returncode == 2 and len(mig.stderr.splitlines()) == 1 and "Traceback" not in mig.stderr, mig
    assert f"destination failed: VM {uuid} already exists on this host, as domain 1 " \
        "(vm1-on-b, running); VM vm1 keeps running on this host" in mig.stderr, mig.stderr
    assert [(v["uuid"], v["state"]) for v in a.vms()] == [(uuid, "running")]
    assert a.shim("vm-digest", "vm1").stdout == before
    assert [(v["uuid"], v["name"], v["state"]) for v in b.vms()] == [(uuid, "vm1-on-b", "running")]
    wait_for(lambda: not procs(b, "emu-manager") and not procs(b, "xenguest"), what="B's emulators to exit")


def test_migration_to_its_own_host_still_shares_the_uuid(hosts, receiver):
    """A localhost migration restores a second copy beside the source's until the commit."""
    a = hosts("A")
    r = receiver(a)
    uuid = a.shim("vm-create", "vm1", "--memory", "16M").stdout.strip()
    a.shim("vm-migrate", "vm1", "--dest", r.address)
    assert [(v["uuid"], v["state"], v["domid"]) for v in a.vms()] == [(uuid, "running", 2)]


def test_a_vm_named_like_a_domid_is_found_by_its_name(hosts):
    """`vm-destroy 14` with a VM named "14" destroys that VM, not domain 14; once no VM is named
    "14", the number means domain 14."""
    a = hosts("A")
    (a.root / "next-domid").write_text("14")           # the hypervisor's counter: the next domid is 14
    a.shim("vm-create", "other", "--memory", "16M")
    a.shim("vm-create", "14", "--memory", "16M")
    assert [(v["name"], v["domid"]) for v in a.vms()] == [("other", 14), ("14", 15)]
    a.shim("vm-destroy", "14")
    assert [(v["name"], v["domid"]) for v in a.vms()] == [("other", 14)]
    a.shim("vm-destroy", "14")
    assert a.vms() == []


@pytest.mark.parametrize("given,content,why", [
    ("no/such.conf", None, "does not exist"),
    ("/dev/zero", None, "is larger than 64 KiB"),
    ("", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "is not a text file of `key = value` lines"),
    ("", b"migration-\xff\xfe = 3\n", "is not a text file of `key = value` lines"),
], ids=["missing", "endless", "binary", "undecodable"])
def test_an_unusable_config_file_is_one_line_naming_it(hosts, tmp_path, given, content, why):
    """`--config FILE` that does not exist or never ends, or a host config that is not text: one
    line naming the file, before anything is done (no VM created)."""
    a = hosts("A")
    config = tmp_path / given if given else a.root / "xenopsd.conf"     # (the host's own: no --config)
    if content is not None:
        config.write_bytes(content)
    out = a.shim(*(["--config", str(config)] if given else []), "vm-create", "vm1", "--memory", "16M",
                 check=False)
    assert out.returncode == 2 and out.stderr == f"xenopsd-shim: config file {config} {why}\n", out
    assert out.stdout == "" and list((a.root / "domains").iterdir()) == []


def test_unknown_config_keys_are_warned_of_by_name(hosts):
    """A misspelt key would leave its default in force without a word: each unknown key is one
    warning naming it and the file; known keys still work and draw none."""
    a = hosts("A")
    config = a.root / "xenopsd.conf"
    config.write_text("# tuned\nmigration-stall-timout = 3\nmigration-connect-timeout = 0\n")
    create = a.shim("vm-create", "vm1", "--memory", "16M")
    [warning] = create.stderr.splitlines()
    assert warning.endswith(f'warning: {config}: unknown key "migration-stall-timout" ignored (known: '
                            "migration-compressor, migration-connect-timeout, migration-request-timeout, "
                            "migration-stall-timeout, migration-handshake-timeout, migration-vgpu-timeout, "
                            "migration-max-connections, migration-accept-in-band, migration-accept-delta, "
                            "migration-delta-cache)"), create
    out = a.shim("vm-migrate", "vm1", "--dest", "127.0.0.1:9", check=False)
    [again, error] = out.stderr.splitlines()
    assert out.returncode != 0 and again.split(" ", 1)[1] == warning.split(" ", 1)[1]   # timestamp aside
    assert "migration-connect-timeout must be a number of seconds, not '0'" in error, out
    assert [v["state"] for v in a.vms()] == ["running"]
