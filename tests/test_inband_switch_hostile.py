"""vm-compress against hostile input and rude endings: one line and a non-zero exit each, and the
migration it aimed at unharmed (page-exact) or, where it failed, the VM running on the source only.

Real processes throughout: vm-migrate paced with --max-bandwidth so that it lasts seconds,
vm-compress from other processes, faults by signals to the source's emu-manager and xenguest.
"""
from __future__ import annotations

import signal
import socket
import subprocess
import time

import psutil
import pytest

from conftest import HostDir, exe, wait_for
from test_compression import configure
from test_faults import procs
from test_inband_switch import compress, finish, start_migration, switch_when_sending

CONTROL = "migration-control-1"         # the first domain's migration control socket, in ROOT/run


def last_line(proc: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc.stderr.strip().splitlines()[-1]


def run_files(host: HostDir) -> list[str]:
    run = host.root / "run"
    return sorted(p.name for p in run.iterdir()) if run.exists() else []


def connected(pid: int) -> bool:
    """Whether the process has a Unix socket open (vm-compress opens one only to connect to the
    control socket; a client's end shows no address)."""
    try:
        return bool(psutil.Process(pid).net_connections(kind="unix"))
    except psutil.Error:
        return False


def raw_request(host: HostDir, line: bytes) -> str:
    """One request straight on the control socket, as a careless client would send it."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(30)
        sock.connect(str(host.root / "run" / CONTROL))
        sock.sendall(line)
        sock.shutdown(socket.SHUT_WR)
        return sock.makefile().read()


def test_bad_arguments_are_one_line_each(hosts):
    """Typos and out-of-range values are refused before anything is asked (exit 2); a VM that
    does not exist or does not migrate is one line, exit 1 or 2, and no control socket appears."""
    a = hosts("A")
    a.shim("vm-create", "vm1", "--memory", "16M", "--image", "mixed")
    cases = {
        ("onn",): "Error: Invalid value for '{off|on|auto}': 'onn' is not one of 'off', 'on', 'auto'.",
        ("on", "--level", "x"): "Error: Invalid value for '--level': 'x' is not a valid integer range.",
        ("on", "--level", "20"): "Error: Invalid value for '--level': 20 is not in the range -7<=x<=19.",
        ("auto", "--level", "-8"): "Error: Invalid value for '--level': -8 is not in the range -7<=x<=19.",
        ("on", "--timeout", "0"): "Error: Invalid value for '--timeout': 0.0 is not in the range 0<x<=3600.0.",
    }
    for argv, line in cases.items():
        proc = compress(a, *argv)
        assert proc.returncode == 2 and last_line(proc) == line and proc.stdout == "", (argv, proc.stderr)
    missing = a.shim("vm-compress", "vm2", "on", check=False)
    assert missing.returncode == 2 and missing.stderr == f"xenopsd-shim: no VM 'vm2' on host {a.root}\n"
    idle = compress(a, "off", "--level", "19")
    assert idle.returncode == 1 and idle.stderr == "Error: VM vm1: it is not migrating\n"
    assert CONTROL not in run_files(a)


def test_malformed_requests_on_the_socket_are_refused_and_the_migration_goes_on(hosts, receiver):
    """Requests vm-compress would never send, straight on the control socket: each refused with
    one line; the migration still takes a good switch and arrives exactly."""
    a, b = hosts("A"), hosts("B")
    r = receiver(b)
    configure(a, "xenguest")
    a.shim("vm-create", "vm1", "--memory", "32M", "--image", "mixed")
    before = a.page_digests("vm1")
    proc = start_migration(a, r.address, "--compress", "--verify", "--max-bandwidth", "4MB/s")
    switch_when_sending(a, "on")
    answers = [raw_request(a, line) for line in (
        b"compress onn\n", b"compress on 99\n", b"compress on x\n", b"decompress on\n", b"compress\n",
        b"compress on 3 4\n", b"\xff\xfe\n", b"x" * 4096, b"")]
    for answer in answers:
        assert answer.startswith("refused ") and answer.endswith("\n") and answer.count("\n") == 1, answers
    assert answers[0] == "refused unknown compression mode 'onn' (one of off, on, auto)\n"
    assert answers[1] == "refused bad compression level '99' (an integer -7..19)\n"
    good = compress(a, "off")
    assert good.returncode == 0 and good.stdout.startswith("VM vm1: in-band compression off (level "), good.stderr
    summary = finish(proc)
    assert summary["verified"] and b.page_digests("vm1") == before
    assert [(s["mode"], s["by"]) for s in summary["compression_switches"]] == [("on", "command"), ("off", "command")]
    assert run_files(a) == []


def test_two_switches_at_once_are_both_answered(hosts, receiver):
    """Two vm-compress at the same moment on one migration: the control socket takes one at a
    time, so both are answered, both applied in some order, and memory arrives exactly."""
    a, b = hosts("A"), hosts("B")
    r = receiver(b)
    a.shim("vm-create", "vm1", "--memory", "32M", "--image", "mixed")
    before = a.page_digests("vm1")
    proc = start_migration(a, r.address, "--no-compress", "--verify", "--max-bandwidth", "4MB/s")
    switch_when_sending(a, "off")
    both = [subprocess.Popen([exe("xenopsd-shim"), "vm-compress", "vm1", *argv], env=a.env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for argv in (["on", "--level", "5"], ["auto"])]
    outs = [p.communicate(timeout=60) for p in both]
    assert [p.returncode for p in both] == [0, 0], outs
    assert outs[0][0].startswith("VM vm1: in-band compression on (level 5) from pass "), outs
    assert outs[1][0].startswith("VM vm1: in-band compression auto (level "), outs
    summary = finish(proc)
    assert summary["verified"] and b.page_digests("vm1") == before
    switches = summary["compression_switches"]
    assert switches[0]["mode"] == "off" and sorted(s["mode"] for s in switches[1:]) == ["auto", "on"], switches
    assert all(s["by"] == "command" for s in switches)
    assert run_files(a) == []


def test_stale_control_socket_of_a_killed_migration(hosts, receiver):
    """vm-migrate SIGKILLed mid-migration leaves its control socket behind (nothing could remove
    it): vm-compress then says the VM is not migrating, the next migration starts (it takes the
    name over) and arrives exactly, and removes the socket when it ends."""
    a, b = hosts("A"), hosts("B")
    r = receiver(b)
    a.shim("vm-create", "vm1", "--memory", "32M", "--image", "mixed")
    before = a.page_digests("vm1")
    killed = start_migration(a, r.address, "--no-compress", "--max-bandwidth", "4MB/s")
    switch_when_sending(a, "on", "--level", "3")
    killed.kill()
    killed.communicate(timeout=60)
    assert CONTROL in run_files(a)
    stale = compress(a, "on")
    assert stale.returncode == 1 and stale.stderr == "Error: VM vm1: it is not migrating\n"
    # Its emulators see their peer gone and exit; the destination drops its half-restored copy.
    wait_for(lambda: not procs(a, "xenguest") and not procs(a, "emu-manager"), what="the orphans to exit")
    wait_for(lambda: b.vms() == [], what="the destination to clean up")
    assert [v["state"] for v in a.vms()] == ["running"] and a.page_digests("vm1") == before

    proc = start_migration(a, r.address, "--no-compress", "--verify", "--max-bandwidth", "8MB/s")
    on = switch_when_sending(a, "on")
    assert on.returncode == 0, on.stderr
    summary = finish(proc)
    assert summary["verified"] and b.page_digests("vm1") == before and a.vms() == []
    assert run_files(a) == []


def test_failed_migration_leaves_no_control_socket(hosts):
    """A migration that fails before it sends anything (no destination listening): one line,
    the VM keeps running, and no control socket is left for vm-compress to find."""
    a = hosts("A")
    a.shim("vm-create", "vm1", "--memory", "16M", "--image", "mixed")
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]          # nobody listens on it once closed
    mig = a.shim("vm-migrate", "vm1", "--dest", f"127.0.0.1:{port}", "--no-compress", check=False)
    assert mig.returncode == 2 and len(mig.stderr.strip().splitlines()) == 1, mig.stderr
    assert "keeps running on this host" in mig.stderr, mig.stderr
    assert run_files(a) == [] and [v["state"] for v in a.vms()] == ["running"]
    assert compress(a, "on").stderr == "Error: VM vm1: it is not migrating\n"


@pytest.mark.parametrize("victim", ["xenguest", "emu-manager"])
def test_emulator_killed_while_a_switch_is_pending(hosts, receiver, victim):
    """The source's xenguest or emu-manager is stopped (so the switch cannot be answered), a
    vm-compress waits, then the stopped process is SIGKILLed: vm-compress gets one error line
    (never hangs), the migration fails with one line, and the VM runs on the source
    only, its memory as it was."""
    a, b = hosts("A"), hosts("B")
    r = receiver(b)
    configure(a, "xenguest")
    a.shim("vm-create", "vm1", "--memory", "32M", "--image", "mixed")
    before = a.page_digests("vm1")
    mig = start_migration(a, r.address, "--compress", "--max-bandwidth", "4MB/s")
    switch_when_sending(a, "off")
    stopped = [p for p in procs(a, victim) if "restore" not in " ".join(p.cmdline())]
    assert len(stopped) == 1, stopped
    stopped[0].send_signal(signal.SIGSTOP)
    pending = subprocess.Popen([exe("xenopsd-shim"), "vm-compress", "vm1", "on", "--level", "4"], env=a.env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # Pending once it is connected (the control socket takes its line at once); then a moment
    # for vm-migrate to pass it on to emu-manager.
    wait_for(lambda: connected(pending.pid), 60, "vm-compress to connect")
    time.sleep(0.5)
    assert pending.poll() is None, pending.communicate()
    stopped[0].kill()
    out, err = pending.communicate(timeout=60)
    # Nothing could answer it: the failed migration releases it as it ends.
    assert (pending.returncode, out, err) == (1, "", "Error: VM vm1: the migration ended before emu-manager answered\n")
    _, mig_err = mig.communicate(timeout=120)
    assert mig.returncode == 2 and len(mig_err.strip().splitlines()) == 1, mig_err
    assert "keeps running on this host" in mig_err and "Traceback" not in mig_err, mig_err
    assert [v["state"] for v in a.vms()] == ["running"] and a.page_digests("vm1") == before
    wait_for(lambda: b.vms() == [], what="the destination to clean up")
    assert run_files(a) == []
    assert compress(a, "on").stderr == "Error: VM vm1: it is not migrating\n"


def test_switch_refused_after_falling_back_to_stream_for_an_older_destination(hosts, receiver):
    """adaptive towards an older host (serve --no-in-band) falls back to the stream method with a
    warning; vm-compress is then refused in one line and the migration arrives exactly."""
    a, b = hosts("A"), hosts("B")
    r = receiver(b, "--no-in-band")
    configure(a, "adaptive")
    a.shim("vm-create", "vm1", "--memory", "32M", "--image", "mixed")
    before = a.page_digests("vm1")
    proc = start_migration(a, r.address, "--compress", "--verify", "--max-bandwidth", "4MB/s")
    refused = switch_when_sending(a, "on", "--level", "3")
    assert refused.returncode == 1 and refused.stderr.strip().splitlines() == [
        "Error: VM vm1: the stream method compresses the whole stream outside xenguest: in-band compression "
        "cannot be switched"]
    summary = finish(proc)
    assert (summary["method"], summary["method_requested"]) == ("stream", "adaptive"), summary
    assert summary["verified"] and summary["compression_switches"] == [] and b.page_digests("vm1") == before
    assert run_files(a) == []
