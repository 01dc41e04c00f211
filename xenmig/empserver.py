"""The emulator side of EMP: serve one emu-manager on a Unix socket in the host's run dir.

Shared by every emulator (xenguest, the vGPU emulator). The main thread
answers requests; a save or restore runs on a worker thread (the real
emulators reply to migrate_live/migrate_nonlive/restore first and work
after), reporting MIGRATION events as it goes. Subclasses supply the work.
"""
from __future__ import annotations

import os
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any, Callable

from xenemu import DomainError, Host

from . import emp
from .log import Log
from .precopy import Aborted, PrecopyStats

ACCEPT_TIMEOUT = float(os.environ.get("XENGUEST_ACCEPT_TIMEOUT", 180))
# From the end of pre-copy to migrate_paused: longer than emu-manager's wait for xenopsd's ack.
PAUSE_TIMEOUT = float(os.environ.get("XENGUEST_PAUSE_TIMEOUT", 180))
# The real xenguest iterates until emu-manager says migrate_pause (or nothing is dirty). Ours
# also stops after this many passes, a safety bound of this project's own, so a peer that never
# says pause costs a bounded time; it then waits in its suspend callback as after a pause.
SAFETY_MAX_ITERATIONS = int(os.environ.get("XENGUEST_SAFETY_MAX_ITERATIONS", 100))
# Mid-pass progress (remaining -1) at most this often, as xenguest's send_emu_progress.
PASS_PROGRESS_INTERVAL = 0.5
Work = Callable[[], str]


SET_ARG_INT, SET_ARG_BOOL = "int", "bool"


def parse_set_arg(kind: str, key: str, value: Any) -> int | bool:
    """One set_args value as xenguest's do_cmd_set_args reads it: strings only, integers in base
    10, booleans the words true/false."""
    if isinstance(value, str):
        if kind == SET_ARG_INT and value.lstrip("-").isdigit():
            return int(value, 10)
        if kind == SET_ARG_BOOL and value in ("true", "false"):
            return value == "true"
    raise ValueError(f"Bad Args: {key} = {value!r}")


class EmpServer:
    """Requests, events and lifetime; `save(live)` and `restore()` return the work to run."""

    # The set_args keys this emulator accepts, with their kinds; any other key is refused.
    SET_ARGS: dict[str, str] = {}

    def __init__(self, host: Host, domid: int, path: Path, *, log: Log) -> None:
        self.host = host
        self.domid = domid
        self.log = log
        self.path = path
        self.stream_fd: int | None = None
        self.args: dict[str, int | bool] = {}
        self.progress_events = False
        self.last_sent = 0                  # the last policy event's figures, for mid-pass events
        self.last_iteration = 0
        self.last_pass_event = 0.0
        self.worker: threading.Thread | None = None
        self.pause_requested = threading.Event()
        self.paused = threading.Event()
        self.abort = threading.Event()
        self.failed = False
        self.chan: emp.Channel | None = None

    # -- what an emulator supplies ---------------------------------------------
    def ready(self) -> None:
        """Called once Ready is printed: work to overlap with emu-manager's connect and first requests."""

    def save(self, live: bool) -> Work:
        raise NotImplementedError

    def restore(self) -> Work:
        raise NotImplementedError

    def track_dirty(self) -> None:
        """Start logging dirty state (nothing to do for an emulator without any)."""

    def compress(self, mode: str, level: int | None) -> int:
        """Our extension: switch in-band compression from the next batch; the level now in force."""
        raise ValueError(f"{emp.CMD_XENMIG_COMPRESS} is not supported by this emulator")

    # -- lifetime -------------------------------------------------------------
    def run(self) -> int:
        """Serve one emu-manager; SIGTERM stops it as SIGINT does, through the clean-up that
        removes the socket (the default SIGTERM death would leave it in the run dir)."""
        signal.signal(signal.SIGTERM, signal.default_int_handler)
        try:
            return self._run()
        except KeyboardInterrupt:
            self.log.error("interrupted")
            return 2

    def _run(self) -> int:
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.path.unlink(missing_ok=True)
            listener.bind(str(self.path))
            os.chmod(self.path, 0o600)
            listener.listen(1)
            listener.settimeout(ACCEPT_TIMEOUT)
            print("Ready", flush=True)
            self.ready()
            conn, _ = listener.accept()
            conn.settimeout(None)
        except (socket.timeout, TimeoutError):
            self.log.error(f"no emu-manager connected within {ACCEPT_TIMEOUT:g} s")
            return 2
        finally:
            listener.close()
            self.path.unlink(missing_ok=True)
        self.chan = emp.Channel(conn)
        try:
            return self._serve()
        finally:
            self.abort.set()
            if self.worker is not None:
                self.worker.join(timeout=10)
            self.chan.close()
            if self.stream_fd is not None:
                os.close(self.stream_fd)

    def _serve(self) -> int:
        try:
            return self._dispatch()
        except emp.EmpError as e:
            self.log.error(f"{e}; giving up")
            return 2

    def _dispatch(self) -> int:
        assert self.chan is not None
        while True:
            message, fds = self.chan.recv()
            command = message.get("execute")
            arguments = message.get("arguments", {})
            self.log.debug(f"<- {command} {arguments if arguments else ''}")
            handler = self.HANDLERS.get(command) if isinstance(command, str) else None
            if handler is None or not isinstance(arguments, dict):
                for fd in fds:
                    os.close(fd)
                self.chan.send(emp.reply_error(f"unknown command {command!r}"))
                continue
            try:
                values = handler(self, arguments, fds)
            except (ValueError, DomainError) as e:
                self.chan.send(emp.reply_error(str(e)))
                continue
            self.chan.send(emp.reply_ok(values))
            if command == emp.CMD_QUIT:
                return 2 if self.failed else 0
            if command in (emp.CMD_MIGRATE_LIVE, emp.CMD_MIGRATE_NONLIVE, emp.CMD_RESTORE):
                assert self.worker is not None
                self.worker.start()

    # -- requests -------------------------------------------------------------
    def _set_args(self, arguments: dict[str, Any], fds: list[int]) -> None:
        if not arguments:
            raise ValueError("No Args")
        parsed = {}
        for key, value in arguments.items():
            if key not in self.SET_ARGS:
                raise ValueError(f"Bad Args: unknown argument {key!r}")
            parsed[key] = parse_set_arg(self.SET_ARGS[key], key, value)
        self.args.update(parsed)

    def _migrate_init(self, arguments: dict[str, Any], fds: list[int]) -> None:
        if len(fds) != 1:
            for fd in fds:
                os.close(fd)
            raise ValueError(f"migrate_init needs exactly one fd, got {len(fds)}")
        if self.stream_fd is not None:
            os.close(self.stream_fd)
        self.stream_fd = fds[0]

    def _track_dirty(self, arguments: dict[str, Any], fds: list[int]) -> None:
        self.track_dirty()

    def _migrate_progress(self, arguments: dict[str, Any], fds: list[int]) -> None:
        self.progress_events = True

    def _migrate_live(self, arguments: dict[str, Any], fds: list[int]) -> None:
        self._start_work(lambda: self.save(live=True))

    def _migrate_nonlive(self, arguments: dict[str, Any], fds: list[int]) -> None:
        self._start_work(lambda: self.save(live=False))

    # A non-live save hears migrate_pause and migrate_paused before migrate_nonlive (emum.c,
    # operation_save); its suspend callback then finds the domain already paused.
    def _migrate_pause(self, arguments: dict[str, Any], fds: list[int]) -> None:
        self._stream()
        self.pause_requested.set()

    def _migrate_paused(self, arguments: dict[str, Any], fds: list[int]) -> None:
        self._stream()
        self.paused.set()

    def _migrate_abort(self, arguments: dict[str, Any], fds: list[int]) -> None:
        self.abort.set()

    def _restore(self, arguments: dict[str, Any], fds: list[int]) -> None:
        self._start_work(self.restore)

    def _quit(self, arguments: dict[str, Any], fds: list[int]) -> None:
        pass

    def _xenmig_compress(self, arguments: dict[str, Any], fds: list[int]) -> dict[str, str]:
        for fd in fds:
            os.close(fd)
        if set(arguments) - {"mode", "level"}:
            raise ValueError(f"Bad Args: {emp.CMD_XENMIG_COMPRESS} takes mode and level")
        mode, level = emp.parse_compress_mode(arguments.get("mode"), arguments.get("level"))
        return emp.compress_reply(mode, self.compress(mode, level))["return"]

    # A handler's return value, if any, is its reply's "return" object.
    HANDLERS: dict[str, Callable[["EmpServer", dict[str, Any], list[int]], dict[str, str] | None]] = {
        emp.CMD_SET_ARGS: _set_args, emp.CMD_MIGRATE_INIT: _migrate_init, emp.CMD_TRACK_DIRTY: _track_dirty,
        emp.CMD_MIGRATE_PROGRESS: _migrate_progress, emp.CMD_MIGRATE_LIVE: _migrate_live,
        emp.CMD_MIGRATE_NONLIVE: _migrate_nonlive, emp.CMD_MIGRATE_PAUSE: _migrate_pause,
        emp.CMD_MIGRATE_PAUSED: _migrate_paused, emp.CMD_MIGRATE_ABORT: _migrate_abort,
        emp.CMD_RESTORE: _restore, emp.CMD_QUIT: _quit, emp.CMD_XENMIG_COMPRESS: _xenmig_compress,
    }

    # -- work -----------------------------------------------------------------
    def _stream(self) -> int:
        if self.stream_fd is None:
            raise ValueError("no stream fd: migrate_init first")
        return self.stream_fd

    def _start_work(self, work: Callable[[], Work]) -> None:
        self._stream()
        if self.worker is not None:
            raise ValueError("an operation is already running")
        self._start(work())

    def wait_paused(self) -> None:
        """The live phase is over: wait for emu-manager to say the domain is paused."""
        deadline = time.monotonic() + PAUSE_TIMEOUT
        while not self.paused.wait(0.1):
            if self.abort.is_set():
                raise Aborted("save aborted while waiting for the domain to pause")
            if time.monotonic() > deadline:
                raise Aborted(f"pre-copy done but the domain was not paused within {PAUSE_TIMEOUT:g} s")

    def event(self, sent: int, remaining: int, iteration: int) -> None:
        if self.chan is not None:
            self.chan.send(emp.progress_event(sent, remaining, iteration))

    def precopy_policy(self, stats: PrecopyStats) -> bool:
        """xenguest's policy: report each known dirty count, stop when told to pause (or when
        nothing is dirty, or at the safety bound). emu-manager decides from these events."""
        if stats.dirty_count >= 0:
            self.last_sent, self.last_iteration = stats.total_written, stats.iteration
            self.event(stats.total_written, stats.dirty_count, stats.iteration)
        if self.abort.is_set():
            raise Aborted("save aborted")
        if self.pause_requested.is_set() or stats.dirty_count == 0:
            return True
        if stats.iteration >= SAFETY_MAX_ITERATIONS:
            self.log.info(f"pre-copy stops at the safety bound of {SAFETY_MAX_ITERATIONS} passes")
            return True
        return False

    def pass_progress(self, done: int, total: int) -> None:
        """Mid-pass events with remaining -1, for a client that asked for progress."""
        now = time.monotonic()
        if done in (0, total):
            self.last_pass_event = now
        elif self.progress_events and now - self.last_pass_event > PASS_PROGRESS_INTERVAL:
            self.event(self.last_sent + done, -1, self.last_iteration)
            self.last_pass_event = now

    def _start(self, work: Work) -> None:
        def body() -> None:
            assert self.chan is not None
            try:
                result = work()
            except Exception as e:  # noqa: BLE001 - any failure is reported over EMP, never a traceback
                self.failed = True
                self.log.error(str(e))
                try:
                    self.chan.send(emp.failure_event(str(e)))
                except emp.EmpError:
                    pass
                return
            try:
                self.chan.send(emp.completion_event(result))
            except emp.EmpError:
                pass
        self.worker = threading.Thread(target=body, name="emulator-worker", daemon=True)
