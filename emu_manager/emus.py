"""The emulators emu-manager drives: one row of the table each, with its state.

An emulator is a process that serves EMP on a Unix socket after printing
`Ready` (xenguest for memory, the vGPU emulator for GPU state). Starting,
connecting, requests with replies, events and shutdown are the same for all.
"""
from __future__ import annotations

import enum
import os
import select
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xenmig import emp


class EmuState(enum.Enum):
    NEW = "new"
    STARTED = "started"             # process running, Ready seen
    CONNECTED = "connected"         # EMP socket open
    INITIALISED = "initialised"     # migrate_init + set_args acknowledged
    RUNNING = "running"             # migrate_live / migrate_nonlive / restore under way
    LIVE_DONE = "live_done"         # emu-manager judged pre-copy done from its events
    PAUSED = "paused"               # told the domain is paused, doing the final copy
    COMPLETED = "completed"
    FAILED = "failed"
    QUIT = "quit"
    EXITED = "exited"


class EmuFailure(Exception):
    def __init__(self, emu: str, text: str) -> None:
        super().__init__(text)
        self.emu = emu


def find_executable(name: str) -> str:
    """Siblings first: the emulators installed beside this emu-manager."""
    sibling = Path(sys.argv[0]).resolve().parent / name
    if sibling.exists():
        return str(sibling)
    found = shutil.which(name)
    if not found:
        raise EmuFailure(name, f"cannot find the {name} executable")
    return found


@dataclass
class Emu:
    name: str                       # xenguest | vgpu
    argv: list[str]
    socket_path: Path
    stream_fd: int
    set_args: dict[str, str] = field(default_factory=dict)   # sent only when not empty (emum.c)
    decides_live: bool = False      # emu-manager waits for its live stage (emum.c: STAGE_READY)
    state: EmuState = EmuState.NEW
    proc: subprocess.Popen | None = None
    chan: emp.Channel | None = None
    reply: dict[str, Any] | None = None
    awaiting_reply: str | None = None
    sent: int = 0
    remaining: int = -1
    iteration: int = 0
    result: str = ""
    error: str = ""
    stats: dict[str, int] = field(default_factory=dict)

    # -- lifetime -------------------------------------------------------------
    def start(self, ready_timeout: float) -> None:
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     close_fds=True)
        assert self.proc.stdout is not None
        out = self.proc.stdout.fileno()
        deadline = time.monotonic() + ready_timeout
        line = b""
        while not line.endswith(b"\n"):
            wait = deadline - time.monotonic()
            ready, _, _ = select.select([out], [], [], max(0.0, wait))
            if not ready:
                raise EmuFailure(self.name, f"{self.name} not Ready within {ready_timeout:g} s")
            chunk = os.read(out, 256)
            if not chunk:
                raise EmuFailure(self.name, f"{self.name} exited before Ready (status {self.proc.wait()})")
            line += chunk
        if line.strip() != b"Ready":
            raise EmuFailure(self.name, f"{self.name} said {line.strip()[:80]!r} instead of Ready")
        self.state = EmuState.STARTED

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(str(self.socket_path))
        except OSError as e:
            sock.close()
            raise EmuFailure(self.name, f"cannot connect to {self.socket_path}: {e.strerror}") from None
        self.chan = emp.Channel(sock)
        self.state = EmuState.CONNECTED

    def send(self, command: str, fds: list[int] | None = None, **arguments: str) -> None:
        """Send a request; the orchestrator's loop collects the reply."""
        if self.chan is None:
            raise EmuFailure(self.name, f"{command} before {self.name} is connected")
        self.awaiting_reply = command
        self.reply = None
        try:
            self.chan.send(emp.request(command, **arguments), fds)
        except emp.EmpError as e:
            raise EmuFailure(self.name, str(e)) from None

    def stop(self, exit_timeout: float) -> int | None:
        """Close the socket and wait for the process; SIGKILL after the timeout."""
        if self.chan is not None:
            self.chan.close()
            self.chan = None
        if self.proc is None:
            return None
        try:
            code = self.proc.wait(timeout=exit_timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self.state = EmuState.EXITED
        return code

    @property
    def percent(self) -> int:
        if self.state in (EmuState.COMPLETED, EmuState.QUIT, EmuState.EXITED):
            return 100
        if self.remaining < 0 or self.sent + self.remaining == 0:
            return 0
        return min(99, self.sent * 100 // (self.sent + self.remaining))
