"""`xenguest -mode listen`: serve one emu-manager over EMP on the host's run dir.

The main thread answers requests; a save or restore runs on a worker thread
(the real xenguest replies to migrate_live/migrate_nonlive/restore first and
works after), reporting MIGRATION events as it goes.
"""
from __future__ import annotations

import os
import socket
import threading
from typing import Any, Callable

from xenemu import Domain, DomainError, Host

from . import emp
from .log import Log
from .restore import Restorer
from .save import Aborted, PlainPages, Policy, Progress, Saver
from .compressed import CompressedPages

ACCEPT_TIMEOUT = float(os.environ.get("XENGUEST_ACCEPT_TIMEOUT", 180))


class Server:
    def __init__(self, host: Host, domid: int, *, compress: bool, log: Log) -> None:
        self.host = host
        self.domid = domid
        self.compress = compress
        self.log = log
        self.path = host.xenguest_socket(domid)
        self.stream_fd: int | None = None
        self.args: dict[str, str] = {}
        self.progress_events = False
        self.worker: threading.Thread | None = None
        self.saver: Saver | None = None
        self.paused = threading.Event()
        self.abort = threading.Event()
        self.failed = False
        self.chan: emp.Channel | None = None

    # -- lifetime -------------------------------------------------------------
    def run(self) -> int:
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.path.unlink(missing_ok=True)
            listener.bind(str(self.path))
            os.chmod(self.path, 0o600)
            listener.listen(1)
            listener.settimeout(ACCEPT_TIMEOUT)
            print("Ready", flush=True)
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
            if self.saver is not None:
                self.saver.abort.set()
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
                handler(self, arguments, fds)
            except (ValueError, DomainError) as e:
                self.chan.send(emp.reply_error(str(e)))
                continue
            self.chan.send(emp.reply_ok())
            if command == emp.CMD_QUIT:
                return 2 if self.failed else 0
            if command in (emp.CMD_MIGRATE_LIVE, emp.CMD_MIGRATE_NONLIVE, emp.CMD_RESTORE):
                assert self.worker is not None
                self.worker.start()

    # -- requests -------------------------------------------------------------
    def _set_args(self, arguments: dict[str, Any], fds: list[int]) -> None:
        self.args.update({str(k): str(v) for k, v in arguments.items()})

    def _migrate_init(self, arguments: dict[str, Any], fds: list[int]) -> None:
        if len(fds) != 1:
            for fd in fds:
                os.close(fd)
            raise ValueError(f"migrate_init needs exactly one fd, got {len(fds)}")
        if self.stream_fd is not None:
            os.close(self.stream_fd)
        self.stream_fd = fds[0]

    def _track_dirty(self, arguments: dict[str, Any], fds: list[int]) -> None:
        self._domain().memory.clean_all()

    def _migrate_progress(self, arguments: dict[str, Any], fds: list[int]) -> None:
        self.progress_events = True

    def _migrate_live(self, arguments: dict[str, Any], fds: list[int]) -> None:
        self._prepare_save(live=True)

    def _migrate_nonlive(self, arguments: dict[str, Any], fds: list[int]) -> None:
        self._prepare_save(live=False)

    def _migrate_pause(self, arguments: dict[str, Any], fds: list[int]) -> None:
        if self.saver is None:
            raise ValueError("migrate_pause without a save in progress")
        self.saver.pause_requested.set()

    def _migrate_paused(self, arguments: dict[str, Any], fds: list[int]) -> None:
        if self.saver is None:
            raise ValueError("migrate_paused without a save in progress")
        self.paused.set()

    def _migrate_abort(self, arguments: dict[str, Any], fds: list[int]) -> None:
        self.abort.set()
        if self.saver is not None:
            self.saver.abort.set()

    def _restore(self, arguments: dict[str, Any], fds: list[int]) -> None:
        domain = self._domain()
        fd = self._stream()
        if domain.state != "building":
            raise ValueError(f"domain {self.domid} is {domain.state}; restore needs a new domain")
        restorer = Restorer(domain, fd)

        def work() -> str:
            result = restorer.run()
            return f"{result.store_mfn} {result.console_mfn}"
        self._start(work)

    def _quit(self, arguments: dict[str, Any], fds: list[int]) -> None:
        pass

    HANDLERS: dict[str, Callable[["Server", dict[str, Any], list[int]], None]] = {
        emp.CMD_SET_ARGS: _set_args, emp.CMD_MIGRATE_INIT: _migrate_init, emp.CMD_TRACK_DIRTY: _track_dirty,
        emp.CMD_MIGRATE_PROGRESS: _migrate_progress, emp.CMD_MIGRATE_LIVE: _migrate_live,
        emp.CMD_MIGRATE_NONLIVE: _migrate_nonlive, emp.CMD_MIGRATE_PAUSE: _migrate_pause,
        emp.CMD_MIGRATE_PAUSED: _migrate_paused, emp.CMD_MIGRATE_ABORT: _migrate_abort,
        emp.CMD_RESTORE: _restore, emp.CMD_QUIT: _quit,
    }

    # -- work -----------------------------------------------------------------
    def _domain(self) -> Domain:
        return self.host.domain(self.domid)

    def _stream(self) -> int:
        if self.stream_fd is None:
            raise ValueError("no stream fd: migrate_init first")
        if self.worker is not None:
            raise ValueError("an operation is already running")
        return self.stream_fd

    def _prepare_save(self, live: bool) -> None:
        fd = self._stream()
        saver = Saver(self._domain(), fd, live=live, policy=Policy.from_env(),
                      suspend=self._wait_paused if live else (lambda: None),
                      on_progress=self._progress, encoder=CompressedPages() if self.compress else PlainPages())
        self.saver = saver

        def work() -> str:
            self.log.info(saver.run().summary(self.domid))
            return "0 0"
        self._start(work)

    def _wait_paused(self) -> None:
        """The live phase is over: wait for emu-manager to say the domain is paused."""
        while not self.paused.wait(0.1):
            if self.abort.is_set():
                raise Aborted("save aborted while waiting for the domain to pause")

    def _progress(self, p: Progress) -> None:
        if self.progress_events and self.chan is not None:
            self.chan.send(emp.progress_event(p.sent, p.remaining, p.iteration))

    def _start(self, work: Callable[[], str]) -> None:
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
        self.worker = threading.Thread(target=body, name="xenguest-worker", daemon=True)
