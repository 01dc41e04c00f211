"""The toolstack's command line against hostile input and rude endings: one line, nothing left."""
from __future__ import annotations

import os
import signal
import subprocess

from conftest import exe
from test_faults import domain_state, procs, vms, wait_for


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
