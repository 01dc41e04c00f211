"""`serve` against hostile peers, and authentication that cannot be off by accident.

A peer that resets, a second `serve` on the same host directory, a request whose
path names another VM, secret files that are missing, empty or unreadable, a
listener on every address, IPv6. A legitimate migration still succeeds page-exact
(`--verify`), and SIGTERM ends the receiver with 0.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid as uuidlib
from typing import Iterator

import pytest

from conftest import HostDir, Receiver, exe
from test_faults import shim, vms, wait_for

SECRET = "s3cret-of-B"
SETTLE = 30.0       # bound on waits for the receiver to catch up (never an assertion on speed)

def connect(address: str) -> socket.socket:
    host, _, port = address.rpartition(":")
    return socket.create_connection((host.strip("[]"), int(port)), timeout=10)


def migrate(a: HostDir, r: Receiver, name: str, secret: str | None = SECRET) -> None:
    """A legitimate live migration, every page checked by the destination."""
    env = {**a.env, "XENOPSD_MIGRATION_SECRET": secret} if secret else a.env
    shim(a, "vm-migrate", name, "--dest", r.address, "--verify", env=env)
    assert vms(a) == []


def stop_promptly(r: Receiver) -> float:
    """SIGTERM; the receiver must exit 0 well before its 90 s per-connection waits of old."""
    t0 = time.monotonic()
    r.proc.send_signal(signal.SIGTERM)
    assert r.proc.wait(timeout=20) == 0, r.log[-2000:]
    return time.monotonic() - t0


@pytest.fixture
def ab(hosts) -> Iterator[tuple[HostDir, HostDir]]:
    a, b = hosts("A"), hosts("B")
    (b.root / "migration-secret").write_text(SECRET + "\n")
    yield a, b


def test_a_peer_that_resets_is_one_line(ab, receiver):
    """A request whose peer is gone by the time the receiver answers: a warning, no traceback."""
    a, b = ab
    r = receiver(b)
    os.kill(r.proc.pid, signal.SIGSTOP)             # the request and the reset are both queued when it reads
    try:
        s = connect(r.address)
        s.sendall(f"PUT /services/xenops/memory/{uuidlib.uuid4()} HTTP/1.1\r\n\r\n".encode())
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        s.close()                                    # RST
    finally:
        os.kill(r.proc.pid, signal.SIGCONT)
    wait_for(lambda: "Connection reset by peer" in r.log or "Broken pipe" in r.log, SETTLE, "the reset noticed")
    shim(a, "vm-create", "vm1", "--memory", "16M")
    migrate(a, r, "vm1")
    assert "Traceback" not in r.log, r.log[-2000:]


def test_request_naming_another_vm_is_refused(ab, receiver):
    """The VM in the stream must be the one the request's path names."""
    a, b = ab
    r = receiver(b)
    shim(a, "vm-create", "vm1", "--memory", "16M")
    other = str(uuidlib.uuid4())
    # The real sender, but its requests name another VM's uuid.
    code = ("import os; from xenopsd_shim import cli, migrate, transport\n"
            "migrate.SourceMigration._connect = lambda self, path, cookies: transport.open_stream("
            "self.dest, path + os.environ['OTHER_UUID'], cookies, self.options.timeouts)\n"
            "cli.main()\n")
    proc = subprocess.run([sys.executable, "-c", code, "vm-migrate", "vm1", "--dest", r.address],
                          env={**a.env, "OTHER_UUID": other, "XENOPSD_MIGRATION_SECRET": SECRET},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1, proc.stderr
    assert f"not VM {other} as its request says" in proc.stderr and "keeps running on this host" in proc.stderr
    assert [v["state"] for v in vms(a)] == ["running"] and vms(b) == []


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("kind", ["missing", "empty", "directory"])
def test_a_named_secret_file_must_be_readable(hosts, tmp_path, kind):
    """A directory stands for "unreadable": root reads any file whatever its mode."""
    b = hosts("B")
    path = tmp_path / "secret"
    if kind == "empty":
        path.write_text("")
    elif kind == "directory":
        path.mkdir()
    port = free_port()
    proc = b.run("xenopsd-shim", "serve", "--listen", f"127.0.0.1:{port}", "--secret-file", str(path),
                 check=False, timeout=30)
    words = {"missing": "does not exist", "empty": "is empty", "directory": "is not a regular file"}[kind]
    assert proc.returncode == 2 and proc.stderr == f"xenopsd-shim: migration secret file {path} {words}\n"
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    assert not (b.root / "run" / "serve-address").exists()


def test_every_address_without_a_secret_is_warned_about(hosts, receiver, tmp_path):
    b = hosts("B")
    r = receiver(b, listen="0.0.0.0:0")
    wait_for(lambda: "without a migration secret" in r.log, SETTLE, "the warning")
    assert r.log.count("warning: listening on 0.0.0.0:") == 1
    stop_promptly(r)
    (tmp_path / "secret").write_text(SECRET)
    guarded = receiver(b, "--secret-file", str(tmp_path / "secret"), listen="0.0.0.0:0")
    loopback = receiver(hosts("C"))
    for quiet in (guarded, loopback):
        stop_promptly(quiet)
        assert "without a migration secret" not in quiet.log


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 loopback here")
def test_ipv6_listener(ab, receiver):
    a, b = ab
    r = receiver(b, listen="[::1]:0")
    assert r.address.startswith("[::1]:")
    shim(a, "vm-create", "vm1", "--memory", "16M")
    migrate(a, r, "vm1")
    assert [v["state"] for v in vms(b)] == ["running"]


def test_second_serve_on_the_same_host_is_refused(ab, receiver):
    """It would destroy the first's half-restored domains and remove its address file."""
    a, b = ab
    r = receiver(b)
    shim(a, "vm-create", "vm1", "--memory", "32M")
    mig = subprocess.Popen([exe("xenopsd-shim"), "vm-migrate", "vm1", "--dest", r.address, "--verify",
                            "--max-bandwidth", "8MB/s"], env={**a.env, "XENOPSD_MIGRATION_SECRET": SECRET},
                           stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: [d["state"] for d in b.domains()] == ["building"], SETTLE, "the restore to start")
        second = b.run("xenopsd-shim", "serve", "--listen", "127.0.0.1:0", check=False, timeout=30)
        assert second.returncode == 2, second.stderr
        assert second.stderr == f"xenopsd-shim: another serve already runs on host directory {b.root}\n"
        assert (b.root / "run" / "serve-address").read_text() == r.address + "\n"
        assert mig.wait(timeout=120) == 0, mig.stderr.read() if mig.stderr else ""
    finally:
        if mig.poll() is None:
            mig.kill()
            mig.wait()
        if mig.stderr:
            mig.stderr.close()
    assert vms(a) == [] and [v["state"] for v in vms(b)] == ["running"]
