"""CPU seconds per process role, sampled while the processes live.

Children of children (xenguest under emu-manager, zstd) are reaped by their
own parents, so their times are read from /proc while they run; the last
sample before a process exits stands for its total.
"""
from __future__ import annotations

import os
import threading
from typing import Callable

import psutil

ROLES = ("emu-manager", "xenguest", "vgpu-emu", "zstd", "nice", "ionice")
INTERVAL = 0.05


def role_of(proc: psutil.Process) -> str:
    try:
        cmd = proc.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return "other"
    for part in cmd[:3]:
        base = os.path.basename(part)
        if base in ROLES:
            return "zstd" if base in ("nice", "ionice") else base
    return "xenopsd-shim" if proc.pid == os.getpid() else "other"


class CpuAccounting:
    """Samples the descendants of this process (or of `roots()`) until stopped."""

    def __init__(self, roots: Callable[[], list[int]] | None = None) -> None:
        self._roots = roots
        self._times: dict[int, tuple[str, float]] = {}
        self._me = psutil.Process()
        self._base = sum(self._me.cpu_times()[:2])
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "CpuAccounting":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _sample(self) -> None:
        children: list[psutil.Process] = []
        try:
            if self._roots is None:
                children = self._me.children(recursive=True)
            else:
                for pid in self._roots():
                    root = psutil.Process(pid)
                    children += [root, *root.children(recursive=True)]
        except (psutil.Error, OSError):   # processes come and go while /proc is read
            pass
        for child in children:
            try:
                t = child.cpu_times()
                prev = self._times.get(child.pid)
                self._times[child.pid] = (prev[0] if prev else role_of(child), t.user + t.system)
            except psutil.Error:
                continue

    def _run(self) -> None:
        while not self._stop.wait(INTERVAL):
            self._sample()

    def stop(self) -> None:
        if not self._stop.is_set():
            self._sample()
            self._stop.set()
            self._thread.join()

    def by_role(self) -> dict[str, float]:
        totals: dict[str, float] = {"xenopsd-shim": round(sum(self._me.cpu_times()[:2]) - self._base, 3)}
        for role, seconds in self._times.values():
            totals[role] = round(totals.get(role, 0.0) + seconds, 3)
        return totals
