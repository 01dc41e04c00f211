"""The emulated hypervisor from the shell: pause really stops the guest, profiles are deterministic."""
from __future__ import annotations

import time

import pytest


def test_pause_stops_every_write_and_unpause_resumes(hosts):
    h = hosts()
    domid = h.create("vm", "32M", image="idle", workload="dirty:50MB/s")
    time.sleep(0.3)
    h.xenemu("pause", str(domid))
    paused = h.xenemu("digest", str(domid))
    time.sleep(0.5)
    assert h.xenemu("digest", str(domid)) == paused
    assert h.domains()[0]["state"] == "paused"
    h.xenemu("unpause", str(domid))
    time.sleep(0.5)
    assert h.xenemu("digest", str(domid)) != paused
    assert h.domains()[0]["state"] == "running"


@pytest.mark.parametrize("profile", ["zero", "idle", "mixed", "random"])
def test_profiles_are_deterministic_per_seed(hosts, profile):
    a, b = hosts("A"), hosts("B")
    x = int(a.xenemu("create", "vm", "--memory", "8M", "--image", profile, "--seed", "7"))
    y = int(b.xenemu("create", "vm", "--memory", "8M", "--image", profile, "--seed", "7"))
    assert a.xenemu("digest", str(x)) == b.xenemu("digest", str(y))
    z = int(b.xenemu("create", "other", "--memory", "8M", "--image", profile, "--seed", "8"))
    assert (b.xenemu("digest", str(z)) == b.xenemu("digest", str(y))) == (profile == "zero")


def test_bad_input_is_one_line(hosts):
    h = hosts()
    for argv in (["create", "vm", "--memory", "12Q"], ["create", "bad/name", "--memory", "8M"],
                 ["create", "vm", "--memory", "8M", "--workload", "dance"], ["pause", "nope"]):
        proc = h.run("xenemu", *argv, check=False)
        assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
