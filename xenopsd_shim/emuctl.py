"""xenopsd's side of emu-manager: spawn it with the real argv, answer its control messages.

emu-manager runs in its own session (xenopsd is a daemon), so a Ctrl-C on
the shim reaches only the shim, which turns it into `abort`.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import Callable

from xenemu import Host
from xenmig import control as ctl
from xenmig.procwait import Exit, wait_exit, wait_or_kill

from .accounting import CpuAccounting
from .log import Logger

class EmuManagerError(Exception):
    """emu-manager reported an error, died, or broke the protocol."""


def executable(name: str) -> str:
    sibling = Path(sys.argv[0]).resolve().parent / name
    if sibling.exists():
        return str(sibling)
    return shutil.which(name) or name


WATCH_INTERVAL = 1.0
DIED_TIMEOUT = 2.0      # a closed control pipe usually means it has died: how long to wait to be sure


class EmuManager:
    def __init__(self, *, domid: int, mode: str, fd: int, live: bool | None = None,
                 codec_args: tuple[str, ...] = (), extra: list[str] | None = None,
                 pass_fds: tuple[int, ...] = (), env: dict | None = None,
                 log: Logger) -> None:
        Host().xenguest_socket(domid)       # a host path too long for it fails here, in plain words
        to_emu_r, self._to_emu = os.pipe()
        self._from_emu, from_emu_w = os.pipe()
        self.argv = [executable("emu-manager"), "-controloutfd", str(from_emu_w), "-controlinfd", str(to_emu_r),
                     "-fd", str(fd), "-mode", mode, "-domid", str(domid)]
        if live is not None:
            self.argv += ["-live", "true" if live else "false"]
        self.argv += [*(extra or []), "-dm", "qemu", *codec_args]     # the codec's own (codecs.Codec.emu_args)
        self.log = log
        self.save_stats: dict[str, dict[str, int]] = {}     # by emulator: its figures of a save
        self.emulator_cpu: dict[str, float] = {}            # by emulator: its CPU, reported once reaped
        self.exit: Exit | None = None                       # once reaped
        # Takers of our other extensions' lines (inband.InBand.take): True when a line was theirs.
        self.reports: list[Callable[[str], bool]] = []
        self._send_lock = threading.Lock()                  # switches are sent from another thread
        try:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                         stderr=subprocess.PIPE, pass_fds=(to_emu_r, from_emu_w, fd, *pass_fds),
                                         start_new_session=True, env=env)
        finally:
            os.close(to_emu_r)
            os.close(from_emu_w)
        self.channel = ctl.LineChannel(self._from_emu, self._to_emu)
        self.log.debug("spawned " + " ".join(self.argv))
        self._relay = threading.Thread(target=self._relay_stderr, daemon=True)
        self._relay.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _relay_stderr(self) -> None:
        assert self.proc.stderr is not None
        try:
            for raw in self.proc.stderr:
                self.log.debug(raw.decode(errors="replace").rstrip())
        except (ValueError, OSError):
            pass   # closed under us: emu-manager died and an orphaned emulator still held the pipe

    def send(self, line: str) -> None:
        self.log.debug(f"-> emu-manager: {line}")
        try:
            with self._send_lock:
                self.channel.send(line)
        except ctl.ControlError as e:
            raise self._last_word() or EmuManagerError(f"emu-manager: {e}") from None

    def _last_word(self) -> EmuManagerError | None:
        """emu-manager went away while we wrote to it: the error it reported before it went (an
        emulator's failure, killed by a signal) says what failed; the broken pipe does not."""
        try:
            while True:
                self.next_message(DIED_TIMEOUT)
        except EmuManagerError as e:
            return e if str(e).startswith("emu-manager reported: ") else None
        except ctl.ControlError:
            return None

    def next_message(self, timeout: float | None = None) -> str:
        """The next control line; an `error:` becomes an exception naming the emulator."""
        try:
            line = self.channel.recv(timeout)
        except ctl.ControlTimeout:
            raise
        except ctl.ControlError as e:
            ended = wait_exit(self.proc, DIED_TIMEOUT)
            if ended is None:
                raise EmuManagerError(f"emu-manager: {e}") from None
            self.exit = ended
            code = ended.code
            how = f"was killed by signal {-code}" if code < 0 else f"exited with status {code}"
            raise EmuManagerError(f"emu-manager {how}") from None
        self.log.debug(f"<- emu-manager: {line}")
        if line.startswith(ctl.MSG_ERROR):
            raise EmuManagerError(f"emu-manager reported: {line[len(ctl.MSG_ERROR):]}")
        return line

    def serve(self, handlers: dict[str, Callable[[str], None]], until: Callable[[str], bool],
              on_info: Callable[[int], None] = lambda p: None, watch: Callable[[], None] | None = None) -> str:
        """Answer requests by prefix until a line satisfies `until`; that line is returned.
        `watch` runs every WATCH_INTERVAL while emu-manager is quiet, and may raise to give up."""
        while True:
            try:
                line = self.next_message(None if watch is None else WATCH_INTERVAL)
            except ctl.ControlTimeout:
                assert watch is not None
                watch()
                continue
            percent = ctl.parse_info(line)
            if percent is not None:
                on_info(percent)
                continue
            if self._took_report(line):
                continue
            if until(line):
                return line
            for prefix, handler in handlers.items():
                if line.startswith(prefix):
                    handler(line[len(prefix):])
                    self.send(ctl.MSG_DONE)
                    break
            else:
                raise EmuManagerError(f"protocol error: unexpected message from emu-manager {line!r}")

    def _took_report(self, line: str) -> bool:
        """Our extensions' reports (an emulator's save figures, its CPU, what `reports` take),
        kept: True; any other line: False; a malformed one raises."""
        try:
            stats, cpu = ctl.parse_save_stats(line), ctl.parse_cpu(line)
            if stats is not None:
                self.save_stats[stats[0]] = stats[1]
            elif cpu is not None:
                self.emulator_cpu[cpu[0]] = cpu[1]
            else:
                return any(take(line) for take in self.reports)
        except ctl.ControlError as e:
            raise EmuManagerError(str(e)) from None
        return True

    def finish(self, timeout: float = 60) -> int:
        """After its last result: what emu-manager still says (its emulators' CPU, or an error,
        which raises) until it closes the control pipe as it exits; then its exit status."""
        while True:
            try:
                line = self.channel.recv(timeout)
            except ctl.ControlTimeout:
                break                   # wait() below ends it
            except ctl.ControlError:
                break                   # closed: it is exiting
            self.log.debug(f"<- emu-manager: {line}")
            if line.startswith(ctl.MSG_ERROR):
                raise EmuManagerError(f"emu-manager reported: {line[len(ctl.MSG_ERROR):]}")
            if not self._took_report(line) and ctl.parse_info(line) is None:
                raise EmuManagerError(f"protocol error: unexpected message from emu-manager {line!r}")
        return self.wait(timeout)

    def wait(self, timeout: float = 60) -> int:
        """Its exit status, once it has exited (SIGKILL after the timeout); reaped at the moment
        it exits, with its CPU."""
        if self.exit is None:
            self.exit = wait_or_kill(self.proc, timeout)
        self._relay.join(timeout=5)
        return self.exit.code

    def account(self, cpu: CpuAccounting) -> None:
        """Its CPU and its emulators', once reaped, to the migration's accounting."""
        if self.exit is not None:
            cpu.add_emu_manager(self.exit.cpu, self.emulator_cpu)

    def abort(self, timeout: float = 60) -> None:
        """`abort`, then wait for it (and so its emulators) to exit; SIGKILL after the timeout."""
        if self.exit is None and self.proc.poll() is None:
            try:
                self.channel.send(ctl.MSG_ABORT)
            except ctl.ControlError:
                pass
        self.wait(timeout)

    def close(self) -> None:
        """Idempotent: a second close must not close fd numbers that another thread now owns."""
        if self.exit is None and self.proc.poll() is None:
            self.abort()
        for fd in (self._to_emu, self._from_emu):
            if fd >= 0:
                os.close(fd)
        self._to_emu = self._from_emu = -1
        if self.proc.stderr is not None:
            self.proc.stderr.close()
