"""One domain: metadata, memory, context blobs, lifecycle, guest workload.

Lifecycle: building -> (paused <-> running) -> dying -> gone. A domain in
`building` is one being created or restored into; it never ran, so a failed
restore can destroy it without losing anything.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import context as ctxmod

if TYPE_CHECKING:      # numpy and psutil load where used: emu-manager reaches this module and needs neither
    import numpy as np
    import psutil
from . import faults
from .memory import CTL_PAUSED, CTL_SIZE, PAGE_SIZE, GuestMemory, mark_dying, open_reserved

STATES = ("building", "paused", "running", "dying")
VGPU_FILE = "vgpu"


class DomainError(Exception):
    """A hypervisor call that failed; its text is meant for the user."""


class Domain:
    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.meta: dict[str, Any] = json.loads((directory / "meta.json").read_text())
        self._memory: GuestMemory | None = None

    # -- creation -----------------------------------------------------------
    @staticmethod
    def space_needed(memory_bytes: int, vgpu_bytes: int) -> int:
        """The bytes `initialise` reserves: memory, dirty log, control page and vGPU memory."""
        return memory_bytes + memory_bytes // PAGE_SIZE + CTL_SIZE + vgpu_bytes

    @staticmethod
    def initialise(directory: Path, info: dict[str, Any]) -> None:
        GuestMemory(directory, info["memory_bytes"], create=True).close()
        if info.get("vgpu_bytes"):
            os.close(open_reserved(directory / VGPU_FILE, int(info["vgpu_bytes"]), create=True))
        (directory / "ctx").mkdir(mode=0o700)
        _write_json(directory / "meta.json", info)

    # -- metadata -----------------------------------------------------------
    domid = property(lambda self: int(self.meta["domid"]))
    uuid = property(lambda self: str(self.meta["uuid"]))
    name = property(lambda self: str(self.meta["name"]))
    memory_bytes = property(lambda self: int(self.meta["memory_bytes"]))

    @property
    def state(self) -> str:
        return self.reload()["state"]

    def reload(self) -> dict[str, Any]:
        try:
            self.meta = json.loads((self.dir / "meta.json").read_text())
        except FileNotFoundError:
            self.meta["state"] = "dying"
        return self.meta

    def update(self, **changes: Any) -> None:
        with self.memory.locked():
            self.reload()
            self.meta.update(changes)
            _write_json(self.dir / "meta.json", self.meta)

    def mark_outgoing(self, outgoing: bool) -> None:
        """This process migrates the VM to its own host, whose copy may then share its uuid."""
        self.update(outgoing_pid=os.getpid() if outgoing else None)

    @property
    def outgoing(self) -> bool:
        """Whether a migration to this very host is under way (its process still runs: one that
        died mid-migration leaves a stale mark, which must not let a second copy in)."""
        pid = self.meta.get("outgoing_pid")
        if not pid:
            return False
        import psutil

        return psutil.pid_exists(pid)

    @property
    def vgpu_bytes(self) -> int:
        return int(self.meta.get("vgpu_bytes") or 0)

    def vgpu_memory(self) -> np.ndarray:
        """The emulated GPU's memory (its own file: it is not guest RAM and has no dirty log)."""
        if not self.vgpu_bytes:
            raise DomainError(f"domain {self.domid} has no vGPU")
        import numpy as np
        os.close(open_reserved(self.dir / VGPU_FILE, self.vgpu_bytes, create=False))   # no SIGBUS on writes
        return np.memmap(self.dir / VGPU_FILE, dtype=np.uint8, mode="r+", shape=(self.vgpu_bytes,))

    @property
    def memory(self) -> GuestMemory:
        if self._memory is None:
            self._memory = GuestMemory(self.dir, self.memory_bytes)
        return self._memory

    def close(self) -> None:
        if self._memory is not None:
            self._memory.close()
            self._memory = None

    # -- context blobs ------------------------------------------------------
    def context(self) -> dict[str, bytes]:
        return {name: (self.dir / "ctx" / name).read_bytes() for name in ctxmod.BLOBS
                if (self.dir / "ctx" / name).exists()}

    def set_context(self, blobs: dict[str, bytes]) -> None:
        if "hvm_context" in blobs and faults.injected(faults.HVM_SETCONTEXT):
            raise DomainError(faults.failure(self.domid, "xc_domain_hvm_setcontext"))
        for name, data in blobs.items():
            if name not in ctxmod.BLOBS:
                raise DomainError(f"unknown context blob {name!r}")
            tmp = self.dir / "ctx" / f".{name}.tmp"
            tmp.write_bytes(data)
            os.replace(tmp, self.dir / "ctx" / name)

    # -- lifecycle ----------------------------------------------------------
    def pause(self) -> None:
        """After this returns no page of the domain changes until unpause.

        The flag is set under the lock the workload writes under, so a write in
        progress finishes first and none starts after. (No SIGSTOP: a process
        stopped while it holds the lock would hold it for ever.)"""
        self.memory.set_flag(CTL_PAUSED, True)
        if self.state == "running":
            self.update(state="paused")

    def unpause(self) -> None:
        state = self.state
        if state not in ("paused", "building"):
            raise DomainError(f"domain {self.domid} is {state}, cannot unpause")
        if faults.injected(faults.UNPAUSE):
            raise DomainError(faults.failure(self.domid, "xc_domain_unpause"))
        self.memory.set_flag(CTL_PAUSED, False)
        if self._workload_process() is None and self.meta.get("workload", "none") != "none":
            self.update(workload_pid=_spawn_workload(self.dir.parent.parent, self.domid))
        self.update(state="running")

    def set_workload(self, spec: str) -> None:
        """Change what the guest does from now on (`none` freezes its memory for a digest).

        The old workload is killed under the memory lock, so it stops between two page
        writes; a paused domain gets its new workload when it is unpaused."""
        from .workload import parse_spec

        parse_spec(spec)
        with self.memory.locked():
            _kill(self._workload_process())
            self.update(workload=spec, workload_pid=None)
        if self.state == "running" and spec != "none":
            self.update(workload_pid=_spawn_workload(self.dir.parent.parent, self.domid))

    def destroy(self) -> None:
        """Stop the workload and free everything; safe to call twice. Nothing here maps or
        reserves the domain's files: it must work on a full disk, on any domain's leftovers."""
        if not self.dir.exists():
            return
        try:
            mark_dying(self.dir)
        except OSError:
            pass
        _kill(self._workload_process())
        self.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def _workload_process(self) -> psutil.Process | None:
        """The workload process if it still runs (and is ours, not a reused pid)."""
        pid = self.reload().get("workload_pid")
        if not pid:
            return None
        import psutil

        try:
            proc = psutil.Process(pid)
            if "xenemu.workload" in " ".join(proc.cmdline()) and str(self.dir.parent.parent) in proc.cmdline():
                return proc
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
        return None

    def describe(self) -> dict[str, Any]:
        meta = dict(self.reload())
        meta.pop("workload_pid", None)
        return meta


def _kill(proc: psutil.Process | None, timeout: float = 10) -> None:
    """SIGKILL a workload and wait until it no longer runs. It is not our child (see
    `_spawn_workload`), so a zombie counts as gone: whoever reaps it may take its time."""
    if proc is None:
        return
    import psutil

    deadline = time.monotonic() + timeout
    try:
        proc.kill()
        while proc.status() != psutil.STATUS_ZOMBIE and time.monotonic() < deadline:
            time.sleep(0.005)
    except psutil.NoSuchProcess:
        pass


def _spawn_workload(root: Path, domid: int) -> int:
    """Start the guest workload detached from the caller (it belongs to the host).

    The launcher forks and exits at once, so the workload is reparented away
    from whoever unpaused the domain and never becomes their zombie.
    """
    out = subprocess.run([sys.executable, "-m", "xenemu.workload", str(root), str(domid)],
                         stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         start_new_session=True, timeout=60, check=False)
    if out.returncode != 0 or not out.stdout.strip().isdigit():
        raise DomainError(f"guest workload failed to start: {out.stderr.decode(errors='replace').strip()}")
    pid = int(out.stdout)
    import psutil

    if not psutil.pid_exists(pid):
        raise DomainError("guest workload exited at start")
    return pid


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)
