"""`serve` against hostile connections, and authentication that cannot be off by accident.

Floods of idle connections (under a low fd limit, and past it), parked vGPU
requests, a peer that resets, a second `serve` on the same host directory, a
request whose path names another VM, secret files that are missing, empty or
unreadable, a listener on every address, IPv6. In each, a legitimate migration
still succeeds page-exact (`--verify`), the receiver's fds and threads come back
to where they were, and SIGTERM ends it with 0.
"""
from __future__ import annotations

import os
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid as uuidlib
from typing import Iterator

import psutil
import pytest

from conftest import HostDir, Receiver, exe, wait_for

SECRET = "s3cret-of-B"
SETTLE = 30.0       # bound on waits for the receiver to catch up (never an assertion on speed)


def low_fd_limit(n: int):  # type: ignore[no-untyped-def]
    return lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (n, n))


def usage(r: Receiver) -> tuple[int, int]:
    """The receiver's (fds, threads)."""
    proc = psutil.Process(r.proc.pid)
    return proc.num_fds(), proc.num_threads()


class Peak:
    """The receiver's highest fd and thread counts while it runs, sampled in the background."""

    def __init__(self, r: Receiver) -> None:
        self.r = r
        self.fds, self.threads = usage(r)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            try:
                fds, threads = usage(self.r)
            except psutil.Error:
                return
            self.fds, self.threads = max(self.fds, fds), max(self.threads, threads)

    def stop(self) -> tuple[int, int]:
        self._stop.set()
        self._thread.join()
        return self.fds, self.threads


def connect(address: str) -> socket.socket:
    host, _, port = address.rpartition(":")
    return socket.create_connection((host.strip("[]"), int(port)), timeout=10)


def flood(address: str, count: int, first: bytes = b"") -> list[socket.socket]:
    """`count` connections that say nothing (or only `first`, never a whole request)."""
    socks = []
    for _ in range(count):
        s = connect(address)
        if first:
            try:
                s.send(first)
            except OSError:
                pass          # closed by the receiver already: it may shed connections
        socks.append(s)
    return socks


def put(address: str, path: str, secret: str | None = SECRET) -> tuple[socket.socket, str]:
    """A request, by hand, with xenopsd's vGPU cookie; the socket and the receiver's first
    handshake message ("Success", or "Error: " and its text; an HTTP status line on a 404)."""
    s = connect(address)
    cookie = "Cookie: dbg=x; vgpu_migration=" + (f"; secret={secret}" if secret else "") + "\r\n"
    s.sendall(f"PUT {path} HTTP/1.1\r\nHost: x\r\n{cookie}\r\n".encode())
    head = b""
    while len(head) < 2 and (chunk := s.recv(2 - len(head))):
        head += chunk
    if head == b"HT":
        while not head.endswith(b"\r\n") and (chunk := s.recv(1)):
            head += chunk
        return s, head.decode().strip()
    if len(head) < 2:
        return s, "closed"
    length = int.from_bytes(head, "big")
    text = b""
    while len(text) < length and (chunk := s.recv(length - len(text))):
        text += chunk
    return s, "Success" if length == 0 else "Error: " + text.decode()


# The VMs that must migrate through a flood keep writing and have no zero page left (the
# hardest case for the memory path), so `--verify` checks a live migration, not an idle copy.
WRITING = ("--image", "busy", "--workload", "dirty:50MB/s")


def vgpu_path(vm_uuid: str) -> str:
    return f"/services/xenops/migrate/vgpu/{vm_uuid}.0"


def close_all(socks: list[socket.socket]) -> None:
    for s in socks:
        s.close()


def migrate(a: HostDir, r: Receiver, name: str, secret: str | None = SECRET) -> None:
    """A legitimate live migration, every page checked by the destination."""
    env = {**a.env, "XENOPSD_MIGRATION_SECRET": secret} if secret else a.env
    a.shim("vm-migrate", name, "--dest", r.address, "--verify", env=env)
    assert name not in [v["name"] for v in a.vms()]


def back_to(r: Receiver, base: tuple[int, int]) -> None:
    wait_for(lambda: usage(r)[0] <= base[0] and usage(r)[1] <= base[1], SETTLE,
             f"the receiver's fds and threads to return to {base} (now {usage(r)})")


def stop_promptly(r: Receiver) -> float:
    """SIGTERM; the receiver must exit 0 well before its 90 s per-connection waits of old."""
    t0 = time.monotonic()
    r.proc.send_signal(signal.SIGTERM)
    assert r.proc.wait(timeout=20) == 0, r.log[-2000:]
    return time.monotonic() - t0


def configure(host: HostDir, **keys: object) -> None:
    host.root.joinpath("xenopsd.conf").write_text("".join(f"migration-{k.replace('_', '-')} = {v}\n"
                                                          for k, v in keys.items()))


@pytest.fixture
def ab(hosts) -> Iterator[tuple[HostDir, HostDir]]:
    a, b = hosts("A"), hosts("B")
    (b.root / "migration-secret").write_text(SECRET + "\n")
    yield a, b


def test_idle_flood_under_a_low_fd_limit(ab, receiver):
    """250 silent connections under `ulimit -n 200`: the receiver holds a bounded number
    (1/4 of its fds), the oldest silent ones make room, a migration still gets in."""
    a, b = ab
    configure(b, request_timeout=3)
    r = receiver(b, preexec_fn=low_fd_limit(200))
    a.shim("vm-create", "vm1", "--memory", "16M", *WRITING)
    base = usage(r)
    peak = Peak(r)
    idle = flood(r.address, 250)
    try:
        assert r.proc.poll() is None, r.log[-2000:]
        migrate(a, r, "vm1")
        fds, threads = peak.stop()
        assert fds - base[0] <= 200 // 4 + 20, (base, fds)     # the bound, plus one migration's own
        back_to(r, base)
    finally:
        close_all(idle)
    assert [v["state"] for v in b.vms()] == ["running"]
    log = r.log
    assert "closing the oldest silent connections to make room (at the bound of 50" in log
    assert "sent no request within 3 s" in log
    assert log.count("closing the oldest silent connections to make room (") <= 2, log[-2000:]  # one a burst
    stop_promptly(r)


def test_accept_survives_running_out_of_fds(ab, receiver):
    """accept() failing with EMFILE, every fd held by a connection that sent a byte (none
    silent to close instead): logged once, the excess accepted and closed with a spare fd,
    and the receiver serves again once the fds are back."""
    a, b = ab
    configure(b, request_timeout=4)
    r = receiver(b)
    a.shim("vm-create", "vm1", "--memory", "16M", *WRITING)
    base = usage(r)
    proc = psutil.Process(r.proc.pid)
    limits = proc.rlimit(resource.RLIMIT_NOFILE)
    slow = flood(r.address, 10, first=b"P")
    excess: list[socket.socket] = []
    try:
        wait_for(lambda: usage(r)[1] == base[1] + 10, SETTLE, "a thread for each partial request")
        proc.rlimit(resource.RLIMIT_NOFILE, (usage(r)[0], limits[1]))     # not one fd more
        excess = flood(r.address, 20)
        wait_for(lambda: "out of file descriptors in accept()" in r.log, SETTLE, "EMFILE in accept()")
        assert r.proc.poll() is None, r.log[-2000:]
        back_to(r, base)             # the partial requests time out
    finally:
        close_all(slow + excess)
        proc.rlimit(resource.RLIMIT_NOFILE, limits)
    migrate(a, r, "vm1")
    back_to(r, base)
    assert 1 <= r.log.count("out of file descriptors in accept(): closing new connections at once (") <= 3
    assert "Traceback" not in r.log
    stop_promptly(r)


def test_parked_vgpu_connections_are_bounded(ab, receiver):
    """vGPU PUTs: authenticated before anything is held, one per VM, a few at once,
    dropped when their peer hangs up or nothing takes them in the vGPU timeout. Each refusal
    is the handshake's error message (xenopsd writes no HTTP response on these routes)."""
    a, b = ab
    configure(b, max_connections=16, vgpu_timeout=3)            # up to 16 / 2 parked at once
    r = receiver(b)
    a.shim("vm-create", "vm1", "--memory", "16M", "--vgpu", "8M", *WRITING)
    base = usage(r)
    nosecret, status = put(r.address, vgpu_path(str(uuidlib.uuid4())), secret=None)
    assert status.startswith("Error: ") and "no migration secret" in status and nosecret.recv(1) == b""
    badpath, status = put(r.address, vgpu_path("../../etc"))
    assert status.startswith("Error: ") and "not a VM uuid" in status
    uuids = [str(uuidlib.uuid4()) for _ in range(8)]
    parked = [put(r.address, vgpu_path(u)) for u in uuids]
    assert [status for _, status in parked] == ["Success"] * 8
    over, status = put(r.address, vgpu_path(str(uuidlib.uuid4())))
    assert status.startswith("Error: ") and "8 mem/vGPU connections already wait" in status
    twice, status = put(r.address, vgpu_path(uuids[0]))
    assert status.startswith("Error: ") and "is already waiting" in status
    close_all([nosecret, badpath, over, twice])
    close_all([s for s, _ in parked[:4]])
    wait_for(lambda: r.log.count("its peer closed the connection") == 4, SETTLE, "hung-up vGPU streams dropped")
    migrate(a, r, "vm1")                                        # its own vGPU connection finds room
    wait_for(lambda: r.log.count("took it within 3 s") == 4, SETTLE, "unmatched vGPU streams dropped")
    close_all([s for s, _ in parked[4:]])
    back_to(r, base)
    assert [v["state"] for v in b.vms()] == ["running"]
    assert "refused PUT /services/xenops/migrate/vgpu/" in r.log and "no migration secret" in r.log
    stop_promptly(r)


def test_a_bad_connection_bound_is_one_line(hosts):
    b = hosts("B")
    configure(b, max_connections="lots")
    proc = b.shim("serve", "--listen", "127.0.0.1:0", check=False, timeout=30)
    assert proc.returncode == 1 and proc.stderr == (f"Error: {b.root / 'xenopsd.conf'}: migration-max-connections "
                                                    "must be a positive whole number, not 'lots'\n"), proc.stderr


def test_sigterm_is_prompt_with_parked_vgpu_connections(ab, receiver):
    a, b = ab
    r = receiver(b)
    parked = [put(r.address, vgpu_path(str(uuidlib.uuid4()))) for _ in range(32)]   # the default's 64 / 2
    try:
        assert {status for _, status in parked} == {"Success"}
        seconds = stop_promptly(r)
    finally:
        close_all([s for s, _ in parked])
    print(f"SIGTERM with 32 parked vGPU connections: exit 0 after {seconds:.2f} s")
    assert "shutting down" in r.log


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
    a.shim("vm-create", "vm1", "--memory", "16M")
    migrate(a, r, "vm1")
    assert "Traceback" not in r.log, r.log[-2000:]


def test_request_naming_another_vm_is_refused(ab, receiver):
    """The VM in the stream must be the one the request names (final_id, and the metadata)."""
    a, b = ab
    r = receiver(b)
    a.shim("vm-create", "vm1", "--memory", "16M")
    other = str(uuidlib.uuid4())
    # The real sender, but its requests name another VM's uuid.
    code = ("import os; from xenopsd_shim import cli, migrate\n"
            "other, meta, cookies = os.environ['OTHER_UUID'], migrate.vm_metadata, migrate.SourceMigration._cookies\n"
            "migrate.vm_metadata = lambda d: meta(d).replace(d.uuid.encode(), other.encode())\n"
            "migrate.SourceMigration._cookies = lambda self: {**cookies(self), 'final_id': other}\n"
            "cli.main()\n")
    proc = subprocess.run([sys.executable, "-c", code, "vm-migrate", "vm1", "--dest", r.address],
                          env={**a.env, "OTHER_UUID": other, "XENOPSD_MIGRATION_SECRET": SECRET},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1, proc.stderr
    assert f"not VM {other} as its request says" in proc.stderr and "keeps running on this host" in proc.stderr
    assert [v["state"] for v in a.vms()] == ["running"] and b.vms() == []


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
    proc = b.shim("serve", "--listen", f"127.0.0.1:{port}", "--secret-file", str(path),
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
    a.shim("vm-create", "vm1", "--memory", "16M", *WRITING)
    migrate(a, r, "vm1")
    assert [v["state"] for v in b.vms()] == ["running"]


def test_second_serve_on_the_same_host_is_refused(ab, receiver):
    """It would destroy the first's half-restored domains and remove its address file."""
    a, b = ab
    r = receiver(b)
    a.shim("vm-create", "vm1", "--memory", "16M", *WRITING)
    mig = subprocess.Popen([exe("xenopsd-shim"), "vm-migrate", "vm1", "--dest", r.address, "--verify",
                            "--max-bandwidth", "8MB/s"], env={**a.env, "XENOPSD_MIGRATION_SECRET": SECRET},
                           stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: [d["state"] for d in b.domains()] == ["building"], SETTLE, "the restore to start")
        second = b.shim("serve", "--listen", "127.0.0.1:0", check=False, timeout=30)
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
    assert a.vms() == [] and [v["state"] for v in b.vms()] == ["running"]


def timed_migration(a: HostDir, r: Receiver, name: str) -> float:
    t0 = time.monotonic()
    migrate(a, r, name)
    return time.monotonic() - t0


@pytest.mark.slow
def test_measure_idle_and_vgpu_floods(ab, receiver):
    """The figures of issue 10: the receiver's peak fds and threads under 1000 idle connections
    and under 500 authenticated vGPU PUTs, and a legitimate migration's time during each
    (`pytest -m slow -s tests/test_hostile_net.py -k measure`)."""
    a, b = ab
    r = receiver(b)
    for name in ("quiet", "idle", "vgpu"):
        a.shim("vm-create", name, "--memory", "64M", *WRITING)
    base = usage(r)
    quiet = timed_migration(a, r, "quiet")
    back_to(r, base)
    peak = Peak(r)
    idle = flood(r.address, 1000)
    try:
        during_idle = timed_migration(a, r, "idle")
        idle_peak = peak.stop()
    finally:
        close_all(idle)
    back_to(r, base)
    peak = Peak(r)
    parked = [put(r.address, vgpu_path(str(uuidlib.uuid4()))) for _ in range(500)]
    try:
        statuses = ["parked" if status == "Success" else "refused" for _, status in parked]
        during_vgpu = timed_migration(a, r, "vgpu")
        vgpu_peak = peak.stop()
        seconds = stop_promptly(r)
    finally:
        close_all([s for s, _ in parked])
    print(f"\nbaseline: {base[0]} fds, {base[1]} threads; a 64 MiB --verify migration alone: {quiet:.2f} s")
    print(f"1000 idle connections: peak {idle_peak[0]} fds, {idle_peak[1]} threads; "
          f"migration meanwhile {during_idle:.2f} s")
    print(f"500 vGPU PUTs ({statuses.count('parked')} parked, {statuses.count('refused')} "
          f"refused): peak {vgpu_peak[0]} fds, {vgpu_peak[1]} threads; migration meanwhile "
          f"{during_vgpu:.2f} s; SIGTERM to exit 0: {seconds:.2f} s")
    assert idle_peak[0] - base[0] <= 64 + 20 and idle_peak[1] - base[1] <= 10
    assert statuses.count("parked") == 32 and vgpu_peak[1] - base[1] <= 32 + 10
