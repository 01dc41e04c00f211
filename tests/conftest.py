"""Fixtures: emulated hosts in temporary directories, and leak checks on them.

Every test gets fresh hosts; at teardown all their domains are destroyed and
the test fails if any process that belongs to them (by argv or by
XENEMU_ROOT in its environment) is still alive, or a socket is left in a
host's run directory.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterator, TypeVar

import psutil
import pytest

BIN = Path(sys.executable).parent
T = TypeVar("T")


def exe(name: str) -> str:
    return str(BIN / name)


# A link of RATE bytes/s into a file: copies its stdin to the file no faster.
PACED_LINK = ("import os, sys, time\n"
              "rate, n, start = float(sys.argv[1]), 0, time.monotonic()\n"
              "with open(sys.argv[2], 'wb') as out:\n"
              "    while chunk := os.read(0, 1 << 16):\n"
              "        out.write(chunk)\n"
              "        n += len(chunk)\n"
              "        time.sleep(max(0.0, n / rate - (time.monotonic() - start)))\n")


@contextlib.contextmanager
def stream_fd(out: Path, rate: int | None = None) -> Iterator[int]:
    """An fd for a saver's -fd, into the file `out`: the file's own, or given `rate`, the write end
    of a link of that many bytes/s (where the writer must block: a link that binds; or where a
    save must last: a guest that writes during it)."""
    if rate is None:
        with open(out, "wb") as f:
            yield f.fileno()
        return
    link = subprocess.Popen([sys.executable, "-c", PACED_LINK, str(rate), str(out)], stdin=subprocess.PIPE)
    try:
        yield link.stdin.fileno()
    finally:
        link.stdin.close()
        assert link.wait(timeout=120) == 0


class HostDir:
    """One emulated host: a directory, plus the commands that act on it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.env = {**os.environ, "XENEMU_ROOT": str(root), "PATH": f"{BIN}:{os.environ.get('PATH', '')}"}

    def run(self, *argv: str, check: bool = True, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
        kw.setdefault("stdout", subprocess.PIPE)
        kw.setdefault("env", self.env)
        proc = subprocess.run([exe(argv[0]), *argv[1:]], stderr=subprocess.PIPE, text=True, timeout=timeout, **kw)
        if check and proc.returncode != 0:
            raise AssertionError(f"{argv} exited {proc.returncode}: {proc.stderr}")
        return proc

    def xenemu(self, *argv: str, **kw) -> str:
        return self.run("xenemu", *argv, **kw).stdout.strip()

    def shim(self, *argv: str, **kw) -> subprocess.CompletedProcess:
        """The toolstack's command line on this host (`check`, `timeout` as for `run`)."""
        return self.run("xenopsd-shim", *argv, **kw)

    def vms(self) -> list[dict]:
        """The toolstack's `vm-list`, in its order."""
        return json.loads(self.shim("vm-list", "--json").stdout)

    def vms_by_name(self) -> dict[str, dict]:
        """`vms()` keyed by VM name, for tests that look VMs up among many."""
        return {vm["name"]: vm for vm in self.vms()}

    def create(self, name: str, memory: str, image: str = "mixed", workload: str = "none") -> int:
        return int(self.xenemu("create", name, "--memory", memory, "--image", image, "--workload", workload))

    def empty(self, name: str, memory: str) -> int:
        return int(self.xenemu("create", name, "--memory", memory, "--empty"))

    def domains(self) -> list[dict]:
        return json.loads(self.xenemu("list", "--json"))

    def page_digests(self, ref: str | int) -> list[str]:
        return [line.split()[1] for line in self.xenemu("digest", str(ref), "--pages").splitlines()]

    def context_digests(self, ref: str | int, libxc_only: bool = False) -> list[str]:
        """Digests of the context blobs; `libxc_only` leaves out the device model's (not in a libxc stream)."""
        lines = self.xenemu("digest", str(ref), "--context").splitlines()[1:]
        return [x for x in lines if not (libxc_only and x.startswith("device_model "))]

    def processes(self) -> list[psutil.Process]:
        return processes_of(self.root)


def processes_of(root: Path) -> list[psutil.Process]:
    """Live processes that belong to a host (by argv or environment)."""
    found = []
    me = os.getpid()
    for proc in psutil.process_iter(["pid", "cmdline"]):
        if proc.pid == me:
            continue
        try:
            if str(root) in " ".join(proc.info["cmdline"] or []) or \
                    proc.environ().get("XENEMU_ROOT", "").startswith(str(root)):
                if proc.status() != psutil.STATUS_ZOMBIE:
                    found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def wait_for(pred: Callable[[], T], timeout: float = 30.0, what: str = "condition") -> T:
    """Poll `pred` until it returns something true, and return that; fail after `timeout` s."""
    deadline = time.monotonic() + timeout
    while not (found := pred()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)
    return found


def assert_clean(root: Path, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while True:
        left = processes_of(root)
        sockets = list((root / "run").glob("*")) if (root / "run").exists() else []
        if not left and not sockets:
            return
        if time.monotonic() > deadline:
            desc = [f"{p.pid}:{' '.join(p.cmdline())}" for p in left]
            raise AssertionError(f"left behind on {root}: processes {desc}, run files {sockets}")
        time.sleep(0.2)


@pytest.fixture
def hosts(tmp_path: Path) -> Iterator[callable]:
    made: list[HostDir] = []

    def make(name: str = "") -> HostDir:
        h = HostDir(tmp_path / (name or f"host{len(made)}"))
        h.root.mkdir(parents=True, exist_ok=True)
        made.append(h)
        return h

    yield make
    # Give processes of a failed test a moment, then make sure everything is gone.
    errors = []
    for h in made:
        for d in h.domains() if (h.root / "domains").exists() else []:
            h.run("xenemu", "destroy", str(d["domid"]), check=False)
        try:
            assert_clean(h.root)
        except AssertionError as e:
            errors.append(str(e))
            for p in processes_of(h.root):
                p.kill()
    shutil.rmtree(tmp_path, ignore_errors=True)
    if errors:
        pytest.fail("; ".join(errors))


class Receiver:
    """A `xenopsd-shim serve` process on a host, on an ephemeral loopback port."""

    def __init__(self, host: HostDir, *extra: str, env: dict[str, str] | None = None,
                 listen: str = "127.0.0.1:0", preexec_fn=None) -> None:
        self.host = host
        self.proc = subprocess.Popen([exe("xenopsd-shim"), "-v", "serve", "--listen", listen, *extra],
                                     env={**host.env, **(env or {})}, stderr=subprocess.PIPE, text=True,
                                     preexec_fn=preexec_fn)
        assert self.proc.stderr is not None
        self._log: list[str] = []
        # Warnings about domains removed at start-up come before the line that says it is up.
        while not (line := self.proc.stderr.readline()).startswith("listening on "):
            assert line, "serve exited before listening: " + "".join(self._log)
            self._log.append(line)
        self.address = line.split()[-1]
        import threading

        self._drain = threading.Thread(target=lambda: self._log.extend(self.proc.stderr), daemon=True)
        self._drain.start()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
        code = self.proc.wait(timeout=120)
        self._drain.join(timeout=5)
        return code

    @property
    def log(self) -> str:
        return "".join(self._log)


@pytest.fixture
def receiver() -> Iterator[callable]:
    started: list[Receiver] = []

    def start(host: HostDir, *extra: str, env: dict[str, str] | None = None, **kw) -> Receiver:
        r = Receiver(host, *extra, env=env, **kw)
        started.append(r)
        return r

    yield start
    for r in started:
        assert r.stop() == 0, r.log[-2000:]


class ProcessWatcher:
    """Records the argv (and host) of every emu-manager / xenguest / zstd that runs meanwhile."""

    NAMES = ("emu-manager", "xenguest", "zstd", "vgpu-emu")

    def __init__(self) -> None:
        import threading

        self.seen: dict[int, tuple[str, list[str]]] = {}
        self.priority: dict[int, tuple[int, int]] = {}     # pid -> (nice, ionice class) when first seen
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        # Cheap enough to run every 5 ms (psutil.process_iter cost the test process a third of a
        # core): /proc read directly, and a pid whose argv can no longer become one of NAMES is
        # not read again (only the toolstack's and the tests' children exec into them, the
        # toolstack's through nice/ionice).
        names = {name.encode() for name in self.NAMES}
        parents = names | {b"xenopsd-shim", b"nice", b"ionice", b"pytest"}
        settled: set[int] = set()
        while not self._stop.wait(0.005):
            pids = {int(e.name) for e in os.scandir("/proc") if e.name.isdigit()}
            settled &= pids             # a pid gone is forgotten: pids wrap at pid_max and get reused
            for pid in pids - settled:
                try:
                    with open(f"/proc/{pid}/cmdline", "rb") as f:
                        raw = f.read()
                except OSError:
                    continue
                argv = raw.split(b"\0")[:-1]
                if not any(os.path.basename(c) in names for c in argv[:4]):
                    if argv and not any(os.path.basename(c) in parents for c in argv[:4]) or \
                            not argv and _kernel_thread_or_zombie(pid):
                        settled.add(pid)    # (an empty argv is also what a process shows mid-exec)
                    continue
                cmd = [c.decode(errors="replace") for c in argv]
                if self.seen.get(pid, ("", []))[1] == cmd:
                    continue
                # A pid is re-read whenever its argv changes: a child seen between fork and
                # exec still shows its parent's argv, and nice/ionice exec into zstd.
                try:
                    proc = psutil.Process(pid)
                    root = proc.environ().get("XENEMU_ROOT", "")
                    self.priority[pid] = (proc.nice(), int(proc.ionice().ioclass))
                except psutil.Error:
                    continue
                self.seen[pid] = (root, cmd)

    def stop(self) -> list[tuple[str, list[str]]]:
        self._stop.set()
        self._thread.join()
        return list(self.seen.values())


def _kernel_thread_or_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state, ppid = f.read().rpartition(b")")[2].split()[:2]
    except (OSError, ValueError):
        return False
    return state == b"Z" or int(ppid) == 2 or pid == 2


def argv_of(seen: list[tuple[str, list[str]]], root: Path, name: str) -> list[list[str]]:
    """The argv (program name first, path stripped) of each `name` process on host `root`."""
    out = []
    for r, cmd in seen:
        for i, part in enumerate(cmd[:4]):
            if os.path.basename(part) == name and r == str(root):
                out.append([name, *cmd[i + 1:]])
                break
    return out
