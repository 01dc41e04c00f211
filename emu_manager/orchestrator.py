"""emu-manager's state machine: an operation's stages over the table of emulators.

Each operation is a fixed list of stages, in the real emum.c's order
(operation_save, operation_load); every stage acts on each emulator whose row
in the table has that stage, and moves its state on. One loop pumps the control
channel and every EMP socket, so an `abort` or an emulator's failure is seen
whatever stage is waiting. emu-manager, not xenguest, decides that pre-copy is done, from
xenguest's MIGRATION events (emum.c, emp_event_cb).
"""
from __future__ import annotations

import os
import select
import time
from dataclasses import dataclass, field
from typing import Callable

from xenmig import control as ctl
from xenmig import emp
from xenmig.log import Log

from .emus import Emu, EmuFailure, EmuState, Stage


def _env_timeout(name: str, default: float) -> float:
    return float(os.environ.get(name, default))


@dataclass(frozen=True)
class Timeouts:
    """The real emu-manager's waits; tests shorten them through the environment."""
    ack: float = field(default_factory=lambda: _env_timeout("EMU_MANAGER_ACK_TIMEOUT", 120))
    ready: float = field(default_factory=lambda: _env_timeout("EMU_MANAGER_READY_TIMEOUT", 180))
    reply: float = field(default_factory=lambda: _env_timeout("EMU_MANAGER_EMP_TIMEOUT", 30))
    exit: float = field(default_factory=lambda: _env_timeout("EMU_MANAGER_EXIT_TIMEOUT", 60))


@dataclass(frozen=True)
class LiveDone:
    """emum.c's rule (emp_event_cb): an event with iteration > 0 and fewer than 50 pages
    remaining (-1, unknown mid-pass, counts as fewer), or iteration >= 4. Tunable through the
    environment for tests and experiments, as here is where the decision is taken."""
    dirty: int = field(default_factory=lambda: int(os.environ.get("EMU_MANAGER_LIVE_DIRTY", 50)))
    iterations: int = field(default_factory=lambda: int(os.environ.get("EMU_MANAGER_LIVE_ITERATIONS", 4)))

    def __call__(self, iteration: int, remaining: int) -> bool:
        return iteration > 0 and (remaining < self.dirty or iteration >= self.iterations)


class Aborted(Exception):
    """xenopsd said `abort`, or went away."""


# An emulator takes a compression switch between its init stage and its completion; before, the
# switch waits in its queue; after, it is refused.
SWITCHABLE = (EmuState.INITIALISED, EmuState.RUNNING, EmuState.LIVE_DONE)
SWITCH_TOO_LATE = (EmuState.COMPLETED, EmuState.EXITED)


class Orchestrator:
    def __init__(self, *, save: bool, live: bool, emus: list[Emu], control: ctl.LineChannel,
                 log: Log, timeouts: Timeouts | None = None) -> None:
        self.save = save
        self.live = live
        self.emus = {e.name: e for e in emus}
        self.control = control
        self.log = log
        self.timeouts = timeouts or Timeouts()
        self.live_done = LiveDone()
        self.stage = "new"
        self.awaiting_ack: str | None = None
        self.restore_requests: list[str] = []
        self.last_percent = -1

    # -- the stage tables -------------------------------------------------------
    def stages(self) -> list[tuple[str, Callable[[], None]]]:
        common = [("start", self.start), ("init", self.init)]
        if not self.save:
            return [*common, ("restore", self.restore), ("quit", self.quit)]
        stop = [("suspend", self.suspend), ("pause", self.pause), ("paused", self.paused)]
        end = [("result", self.result), ("quit", self.quit)]
        if self.live:
            return [*common, ("track", self.track), ("live", self.migrate_live), ("ready", self.ready), *stop,
                    ("complete", self.complete), *end]
        return [*common, *stop, ("nonlive", self.migrate_nonlive), *end]

    def run(self) -> int:
        """0 on success, 2 on failure or abort (after the emulators are gone)."""
        try:
            for name, action in self.stages():
                self.stage = name
                self.log.debug(f"stage {name}: " + ", ".join(f"{e.name}={e.state.value}" for e in self.emus.values()))
                action()
            return 0
        except Aborted as e:
            self.log.info(f"aborting in stage {self.stage}: {e}")
            self._abort_emus()
            return 2
        except (EmuFailure, ctl.ControlError, emp.EmpError) as e:
            emu = getattr(e, "emu", None)
            self.log.error(f"stage {self.stage}: {e}")
            try:
                self.tell(f"{ctl.MSG_ERROR}{emu + ' ' if emu else ''}{e}")
            except ctl.ControlError:
                pass
            self._abort_emus()
            return 2
        finally:
            for emu in self.emus.values():
                emu.stop(self.timeouts.exit)

    def taking_part(self, stage: Stage) -> list[Emu]:
        """The emulators whose row has this stage, in table order."""
        return [emu for emu in self.emus.values() if emu.takes_part(stage)]

    # -- stages -----------------------------------------------------------------
    def start(self) -> None:
        for emu in self.taking_part(Stage.START):
            emu.start(self.timeouts.ready)
            emu.connect()

    def init(self) -> None:
        for emu in self.taking_part(Stage.INIT):
            self.request(emu, emp.CMD_MIGRATE_INIT, fds=[emu.stream_fd])
            if emu.set_args:
                self.request(emu, emp.CMD_SET_ARGS, **emu.set_args)
            emu.state = EmuState.INITIALISED
            self._settle(emu)           # switches that came early: now, before anything else

    def track(self) -> None:
        for emu in self.taking_part(Stage.TRACK):
            self.request(emu, emp.CMD_TRACK_DIRTY)
            self.request(emu, emp.CMD_MIGRATE_PROGRESS)

    def migrate_live(self) -> None:
        for emu in self.taking_part(Stage.LIVE):
            self.ack(ctl.MSG_PREPARE + emu.name)
            self.request(emu, emp.CMD_MIGRATE_LIVE)
            emu.state = EmuState.RUNNING

    def migrate_nonlive(self) -> None:
        """One emulator at a time, each to completion (emum.c, save_nonlive_one_by_one)."""
        for emu in self.taking_part(Stage.NONLIVE):
            self.ack(ctl.MSG_PREPARE + emu.name)
            self.request(emu, emp.CMD_MIGRATE_NONLIVE)
            emu.state = EmuState.RUNNING
            self.wait_until(lambda: emu.state == EmuState.COMPLETED, None, f"{emu.name} to complete")
            self.log.info(f"{emu.name}: completed: pages {emu.sent}")

    def ready(self) -> None:
        self.wait_until(lambda: all(e.state != EmuState.RUNNING for e in self.taking_part(Stage.READY)),
                        None, "pre-copy to be done")

    def suspend(self) -> None:
        self.ack(ctl.MSG_SUSPEND)

    def pause(self) -> None:
        for emu in self.taking_part(Stage.PAUSE):
            self.request(emu, emp.CMD_MIGRATE_PAUSE)

    def paused(self) -> None:
        for emu in self.taking_part(Stage.PAUSED):
            self.request(emu, emp.CMD_MIGRATE_PAUSED)

    def complete(self) -> None:
        completing = self.taking_part(Stage.COMPLETE)
        self.wait_until(lambda: all(e.state == EmuState.COMPLETED for e in completing), None,
                        "the emulators to complete")
        self._report_percent()
        for emu in completing:
            self.log.info(f"{emu.name}: completed: iterations {emu.iteration + 1}, pages {emu.sent}")

    def result(self) -> None:
        for emu in self.emus.values():
            if emu.save_stats is not None:
                self.tell(ctl.save_stats(emu.name, emu.save_stats))
        self.tell(f"{ctl.MSG_RESULT}0 0")

    def restore(self) -> None:
        restoring = self.taking_part(Stage.RESTORE)
        reported: set[str] = set()
        while len(reported) < len(restoring):
            self.wait_until(lambda: bool(self.restore_requests) or any(
                e.state == EmuState.COMPLETED and e.name not in reported for e in restoring),
                None, "restore requests")
            while self.restore_requests:
                emu = self.emus[self.restore_requests.pop(0)]
                self.request(emu, emp.CMD_RESTORE)
                emu.state = EmuState.RUNNING
            for emu in restoring:
                if emu.state == EmuState.COMPLETED and emu.name not in reported:
                    reported.add(emu.name)
                    result = f" {emu.result}" if emu.kind.sends_result else ""
                    self.tell(f"{ctl.MSG_RESULT}{emu.name}{result}")

    def quit(self) -> None:
        """Every emulator told to quit, then each reaped (they exit side by side); then, our
        extension, each one's CPU reported to xenopsd."""
        quitting = self.taking_part(Stage.QUIT)
        for emu in quitting:
            self.request(emu, emp.CMD_QUIT)
            emu.hang_up()
        for emu in quitting:
            code = emu.stop(self.timeouts.exit)
            if code:
                raise EmuFailure(emu.name, f"{emu.name} exited with status {code}")
        for emu in quitting:
            if emu.cpu is not None:
                self.tell(ctl.cpu(emu.name, emu.cpu))

    # -- requests, acks and the event loop ----------------------------------------
    def tell(self, line: str) -> None:
        """A control message to xenopsd (with -debuglog true, logged: the order is the transcript)."""
        self.log.debug(f"-> xenopsd: {line}")
        self.control.send(line)

    def request(self, emu: Emu, command: str, fds: list[int] | None = None, **arguments: str) -> None:
        self._settle(emu)
        self.log.debug(f"-> {emu.name}: {command}")
        emu.reply = None
        emu.send(command, fds, **arguments)
        self.wait_until(lambda: emu.reply is not None, self.timeouts.reply, f"{emu.name}'s reply to {command}")
        assert emu.reply is not None
        if "error" in emu.reply:
            raise EmuFailure(emu.name, f"{command}: {emu.reply['error']}")

    def _settle(self, emu: Emu) -> None:
        """Nothing in flight to this emulator and none of its switches still queued that it
        could take now (EMP has one request outstanding at a time: never nest one in another)."""
        while True:
            self.wait_until(lambda: emu.awaiting_reply is None, self.timeouts.reply,
                            f"{emu.name}'s reply to {emu.awaiting_reply}")
            if not self._send_switch(emu):
                return

    def _send_switch(self, emu: Emu) -> bool:
        """Send the emulator's first queued switch if it can take it now; whether one was sent."""
        if not emu.switches or emu.awaiting_reply is not None or emu.state not in SWITCHABLE:
            return False
        mode, level = emu.switches.pop(0)
        self.log.debug(f"-> {emu.name}: {emp.CMD_XENMIG_COMPRESS} {mode}" + ("" if level is None else f" {level}"))
        emu.send(emp.CMD_XENMIG_COMPRESS, **emp.compress_request(mode, level)["arguments"])
        return True

    def ack(self, message: str) -> None:
        self.awaiting_ack = message
        self.tell(message)
        self.wait_until(lambda: self.awaiting_ack is None, self.timeouts.ack, f"xenopsd's ack of {message}")

    def wait_until(self, done: Callable[[], bool], timeout: float | None, what: str) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not done():
            wait = None if deadline is None else deadline - time.monotonic()
            if wait is not None and wait <= 0:
                raise ctl.ControlError(f"timed out after {timeout:g} s waiting for {what}")
            self._pump(wait)

    def _pump(self, timeout: float | None) -> None:
        """Handle what is already buffered; only when nothing is, wait on the fds.

        (Blocking after handling a buffered message would sit on an event that
        the caller's condition was waiting for.)"""
        handled = False
        while self.control.has_line():
            self._on_control(self.control.pop())
            handled = True
        for emu in self.emus.values():
            while emu.chan is not None and emu.chan.has_message():
                self._on_emu(emu, emu.chan.recv(self.timeouts.reply)[0])
                handled = True
        for emu in self.emus.values():
            handled = self._send_switch(emu) or handled
        if handled:
            return
        sources: dict[int, Emu | None] = {self.control.infd: None}
        for emu in self.emus.values():
            if emu.chan is not None:
                sources[emu.chan.sock.fileno()] = emu
        ready, _, _ = select.select(list(sources), [], [], timeout)
        for fd in ready:
            emu = sources[fd]
            if emu is None:
                try:
                    self.control.fill()
                except ctl.ControlError as e:
                    raise Aborted(str(e)) from None
                while self.control.has_line():
                    self._on_control(self.control.pop())
            else:
                assert emu.chan is not None
                try:
                    message, fds = emu.chan.recv(self.timeouts.reply)
                except emp.EmpError as e:
                    raise EmuFailure(emu.name, str(e)) from None
                for extra in fds:
                    os.close(extra)
                self._on_emu(emu, message)

    # -- messages from xenopsd ------------------------------------------------------
    def _on_control(self, line: str) -> None:
        """Dispatch on the message's word ("done", "abort") or prefix ("restore:"), with what follows."""
        self.log.debug(f"xenopsd: {line}")
        word, colon, argument = line.partition(":")
        handler = self.CONTROL.get(word + colon)
        if handler is None:
            raise self._unexpected(line)
        handler(self, argument)

    @staticmethod
    def _unexpected(line: str) -> ctl.ControlError:
        return ctl.ControlError(f"protocol error: unexpected message {line!r}")

    def _on_done(self, argument: str) -> None:
        if self.awaiting_ack is None:
            raise ctl.ControlError("protocol error: 'done' when no acknowledgement was asked for")
        self.awaiting_ack = None

    def _on_abort(self, argument: str) -> None:
        raise Aborted("xenopsd sent abort")

    def _on_restore(self, name: str) -> None:
        line = ctl.MSG_RESTORE + name
        if self.save:
            raise self._unexpected(line)
        emu = self.emus.get(name)
        # xenopsd may ask before this emulator is initialised; the restore stage takes it up.
        waiting = (EmuState.NEW, EmuState.STARTED, EmuState.CONNECTED, EmuState.INITIALISED)
        if emu is None or not emu.takes_part(Stage.RESTORE) or emu.state not in waiting \
                or name in self.restore_requests:
            raise ctl.ControlError(f"protocol error: unexpected {line!r}")
        self.restore_requests.append(name)

    def _on_compress(self, argument: str) -> None:
        """Our extension: queue a compression switch for an emulator, or refuse it at once. Never
        an `error:` (that would fail the migration); xenopsd sends no `done` for it."""
        name = argument.split(" ")[0] or "-"
        try:
            name, mode, level = ctl.parse_compress_request(argument)
        except ValueError as e:
            self.tell(ctl.compress_refused(name, str(e)))
            return
        emu = self.emus.get(name)
        if not self.save:
            reason = "only a save compresses"
        elif emu is None:
            reason = f"no emulator {name} in this migration"
        elif not emu.kind.switches_compression:
            reason = f"{name} has no in-band compression"
        elif emu.state in SWITCH_TOO_LATE:
            reason = f"{name} has completed its save"
        else:
            emu.switches.append((mode, level))
            self._send_switch(emu)
            return
        self.tell(ctl.compress_refused(name, reason))

    CONTROL: dict[str, Callable[["Orchestrator", str], None]] = {
        ctl.MSG_DONE: _on_done, ctl.MSG_ABORT: _on_abort, ctl.MSG_RESTORE: _on_restore,
        ctl.MSG_COMPRESS: _on_compress,
    }

    # -- messages from the emulators -------------------------------------------------
    def _on_emu(self, emu: Emu, message: dict) -> None:
        if "return" in message or "error" in message:
            if emu.awaiting_reply is None:
                raise EmuFailure(emu.name, f"{emu.name} replied when nothing was asked")
            if emu.awaiting_reply == emp.CMD_XENMIG_COMPRESS:
                emu.awaiting_reply = None
                self._on_switched(emu, message)
                return
            emu.awaiting_reply = None
            emu.reply = message
            return
        event, data = message.get("event"), message.get("data")
        handler = self.EVENTS.get(event) if isinstance(event, str) else None
        if handler is None or not isinstance(data, dict):
            raise EmuFailure(emu.name, f"{emu.name} sent an unknown message {str(message)[:120]}")
        handler(self, emu, data)

    def _on_migration(self, emu: Emu, data: dict) -> None:
        """A MIGRATION event: the emulator's completion or failure, or its progress."""
        if "status" in data:
            if data["status"] != emp.STATUS_COMPLETED:
                raise EmuFailure(emu.name, str(data.get("error", data["status"])))
            emu.state = EmuState.COMPLETED
            emu.result = str(data.get("result", ""))
            while emu.switches:
                emu.switches.pop(0)
                self.tell(ctl.compress_refused(emu.name, f"{emu.name} has completed its save"))
            return
        figures = {key: data.get(key, -1) for key in ("sent", "remaining", "iteration")}
        if set(data) - set(figures) or not all(type(v) is int for v in figures.values()):
            raise EmuFailure(emu.name, f"{emu.name} sent a malformed progress event")
        sent, remaining, iteration = figures["sent"], figures["remaining"], figures["iteration"]
        if remaining < 0 and iteration < 0:
            return
        if remaining == 0 and iteration == 0:
            remaining = -1                  # emum.c's fix-up: such a count is not to be trusted
        if remaining != -1:
            emu.sent, emu.remaining, emu.iteration = sent, remaining, iteration
        self.log.debug(f"{emu.name}: iteration {iteration} sent {sent} remaining {remaining}")
        if emu.state == EmuState.RUNNING and self.live and self.live_done(iteration, remaining):
            emu.state = EmuState.LIVE_DONE
        self._report_percent()

    def _on_save_stats(self, emu: Emu, data: dict) -> None:
        try:
            emu.save_stats = emp.parse_save_stats(data)
        except emp.EmpError as e:
            raise EmuFailure(emu.name, f"{emu.name} sent {e}") from None

    def _on_switched(self, emu: Emu, reply: dict) -> None:
        """An emulator's reply to xenmig_compress, answered to xenopsd."""
        if "error" in reply:
            self.tell(ctl.compress_refused(emu.name, str(reply["error"])))
            return
        try:
            mode, level = emp.parse_compress_reply(reply)
        except emp.EmpError as e:
            raise EmuFailure(emu.name, f"{emu.name} sent {e}") from None
        self.tell(ctl.compress_applied(emu.name, mode, level))

    def _on_iteration(self, emu: Emu, data: dict) -> None:
        """A pass's figures, forwarded at once."""
        try:
            line = ctl.iteration(emu.name, data)
        except emp.EmpError as e:
            raise EmuFailure(emu.name, f"{emu.name} sent {e}") from None
        self.tell(line)

    EVENTS: dict[str, Callable[["Orchestrator", Emu, dict], None]] = {
        emp.EVENT_MIGRATION: _on_migration, emp.EVENT_SAVE_STATS: _on_save_stats,
        emp.EVENT_ITERATION: _on_iteration,
    }

    def _report_percent(self) -> None:
        if not self.save:
            return
        percent = min(e.percent for e in self.emus.values())
        if percent != self.last_percent:
            self.last_percent = percent
            self.tell(ctl.info(percent))

    def _abort_emus(self) -> None:
        for emu in self.emus.values():
            if emu.chan is not None:        # stop() closed it when the emulator exited
                try:
                    emu.chan.send(emp.request(emp.CMD_MIGRATE_ABORT))
                except emp.EmpError:
                    pass
