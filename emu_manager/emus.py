"""The emulators emu-manager drives: the table of kinds (emum.c's `struct emu emus[]`) and,
for each one run, its state.

An emulator is a process that serves EMP on a Unix socket after printing
`Ready` (xenguest for memory, the vGPU emulator for GPU state). Starting,
connecting, requests with replies, events and shutdown are the same for all;
what differs between kinds is data in their row, so the stage logic never asks
which emulator it has.
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
from typing import Any, Callable, Mapping

from xenemu import Host
from xenmig import emp
from xenmig.procwait import wait_or_kill


class Stage(enum.Flag):
    """The stages of an operation an emulator takes part in (emum.c's stage bitmasks)."""
    START = enum.auto()             # run it, wait for Ready, connect (and so quit it at the end)
    INIT = enum.auto()              # migrate_init with its stream fd, then its set_args
    TRACK = enum.auto()             # track_dirty + migrate_progress (live save)
    LIVE = enum.auto()              # prepare:<emu>, migrate_live
    READY = enum.auto()             # emu-manager waits until its pre-copy is judged done
    PAUSE = enum.auto()             # migrate_pause
    PAUSED = enum.auto()            # migrate_paused
    NONLIVE = enum.auto()           # prepare:<emu>, migrate_nonlive, to completion
    COMPLETE = enum.auto()          # emu-manager waits for its completion (live save)
    RESTORE = enum.auto()           # restore when xenopsd asks, result:<emu> when done
    QUIT = enum.auto()              # quit, then its exit status is checked


ALL_STAGES = ~Stage(0)
PV_MODES = ("save", "restore")


class DmArg(enum.Enum):
    """How a `-dm KIND[:VALUE]` argument for this kind is parsed (emum.c's parse_dm_arg)."""
    FLAG = "flag"                   # `-dm KIND` only; any value is a bad dm arg
    STREAM_FD = "stream_fd"         # `-dm KIND:FD`: the emulator's own stream fd, which must be open


def _xenguest_set_args(options: Mapping[str, Any], emulators: int) -> dict[str, str]:
    """xenguest's set_args, as emum.c builds them: the ports given (restore), pv for PV modes
    (main), vgpu when a vGPU is migrated too (configure_emus)."""
    set_args = {key: str(options[key]) for key in ("store_port", "console_port") if options[key] is not None}
    if options["mode"] in PV_MODES:
        set_args["pv"] = "true"
    if emulators > 1:
        set_args["vgpu"] = "true"
    return set_args


@dataclass(frozen=True)
class EmuKind:
    """One row of the emulator table."""
    name: str
    stages: Stage                   # Stage(0): listed, but xenopsd runs it and saves its state
    dm: DmArg
    always: bool = False            # in the table without a -dm, on the main stream fd (-fd)
    executable: str = ""
    argv: tuple[str, ...] = ()      # after the executable; "{domid}" is the domain's id
    # (option, argv added when it is set and not 0; "{}" in it is the option's value)
    argv_if: tuple[tuple[str, tuple[str, ...]], ...] = ()
    socket: Callable[[Host, int], Path] | None = None       # its EMP socket, from the host and domid
    sends_result: bool = False      # restore: "result:<emu> <its result>", not just "result:<emu>"
    set_args: Callable[[Mapping[str, Any], int], dict[str, str]] | None = None   # (options, emulators run)
    switches_compression: bool = False     # takes our xenmig_compress (in-band compression) mid-save

    def command(self, executable: str, options: Mapping[str, Any]) -> list[str]:
        argv = [executable, *(arg.format(domid=options["domid"]) for arg in self.argv)]
        for option, extra in self.argv_if:
            if options[option]:
                argv += [arg.format(options[option]) for arg in extra]
        return argv


EMU_KINDS: dict[str, EmuKind] = {kind.name: kind for kind in (
    EmuKind("xenguest", ALL_STAGES, DmArg.FLAG, always=True, executable="xenguest",
            argv=("-debug", "-domid", "{domid}", "-controloutfd", "2", "-controlinfd", "0", "-mode", "listen"),
            argv_if=(("compress", ("-compress", "true")), ("delta-cache", ("-delta-cache", "{}"))),
            socket=Host.xenguest_socket,
            sends_result=True, set_args=_xenguest_set_args, switches_compression=True),
    EmuKind("vgpu", ALL_STAGES & ~Stage.READY, DmArg.STREAM_FD, executable="vgpu-emu",
            argv=("-domid", "{domid}", "-mode", "listen"),
            socket=lambda host, domid: host.run_dir / f"vgpu-control-{domid}"),
    EmuKind("qemu", Stage(0), DmArg.FLAG),
)}


class EmuState(enum.Enum):
    NEW = "new"
    STARTED = "started"             # process running, Ready seen
    CONNECTED = "connected"         # EMP socket open
    INITIALISED = "initialised"     # migrate_init + set_args acknowledged
    RUNNING = "running"             # migrate_live / migrate_nonlive / restore under way
    LIVE_DONE = "live_done"         # emu-manager judged pre-copy done from its events
    COMPLETED = "completed"
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
    kind: EmuKind
    argv: list[str]
    socket_path: Path
    stream_fd: int
    set_args: dict[str, str] = field(default_factory=dict)   # sent only when not empty (emum.c)
    state: EmuState = EmuState.NEW
    proc: subprocess.Popen | None = None
    chan: emp.Channel | None = None
    reply: dict[str, Any] | None = None
    awaiting_reply: str | None = None
    sent: int = 0
    remaining: int = -1
    iteration: int = 0
    result: str = ""
    save_stats: dict[str, int] | None = None    # its figures of a save, forwarded before "result:"
    cpu: float | None = None                    # its CPU seconds, once it has exited and been reaped
    switches: list[tuple[str, int | None]] = field(default_factory=list)  # xenmig_compress (mode, level) queued

    @property
    def name(self) -> str:
        return self.kind.name

    def takes_part(self, stage: Stage) -> bool:
        return stage in self.kind.stages

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
        """Send a request; the orchestrator's loop collects the reply (a switch's reply it
        answers to xenopsd itself, leaving `reply` to the request the stages wait on)."""
        if self.chan is None:
            raise EmuFailure(self.name, f"{command} before {self.name} is connected")
        self.awaiting_reply = command
        try:
            self.chan.send(emp.request(command, **arguments), fds)
        except emp.EmpError as e:
            raise EmuFailure(self.name, str(e)) from None

    def hang_up(self) -> None:
        """Close the EMP socket: after `quit`, the emulator's end closes as it exits."""
        if self.chan is not None:
            self.chan.close()
            self.chan = None

    def stop(self, exit_timeout: float) -> int | None:
        """Close the socket and wait for the process; SIGKILL after the timeout."""
        self.hang_up()
        if self.proc is None:
            return None
        if self.state == EmuState.EXITED:
            return self.proc.returncode
        ended = wait_or_kill(self.proc, exit_timeout)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self.state = EmuState.EXITED
        self.cpu = ended.cpu
        return ended.code

    @property
    def percent(self) -> int:
        if self.state in (EmuState.COMPLETED, EmuState.EXITED):
            return 100
        if self.remaining < 0 or self.sent + self.remaining == 0:
            return 0
        return min(99, self.sent * 100 // (self.sent + self.remaining))
