"""`host-evacuate`: every running VM of this host migrated to one destination, N at a time.

As xapi runs one task per VM, each migration is its own `xenopsd-shim vm-migrate NAME --json`
child, so one that crashes cannot take the others, and each makes the decisions vm-migrate makes
(the pool's compression policy, the fall-back that keeps a failed VM running here). The children
run in their own process groups: a signal reaches them only through this process, once each,
which forwards SIGINT or SIGTERM to the running ones (each cancels its migration) and starts no
new one.
"""
from __future__ import annotations

import json
import queue
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from types import FrameType
from typing import IO, Any, Callable

import click

from xenemu import Host

from . import cancel, policy
from .emuctl import executable
from .log import Logger


# xapi's host.evacuate migrates `evacuate_batch_size` VMs at a time; 0 (what `xe host-evacuate`
# sends by default) means xapi.conf's evacuation-batch-size, which is 10.
DEFAULT_PARALLEL = 10
SHIM = "xenopsd-shim"
ERROR_PREFIX = f"{SHIM}: "      # how the child's one error line begins
WAKE_INTERVAL = 0.2             # how often the scheduler looks for a signal while children run
NOT_STARTED = "not started: the evacuation was cancelled"
STDERR_KEPT = 100               # a child's last stderr lines kept (its error line is its last)


def parse_parallel(text: str | None) -> int:
    """--parallel: a whole number of at least 1 (ValueError: the one line the user sees)."""
    if text is None:
        return DEFAULT_PARALLEL
    if not text.strip().isdigit() or int(text) < 1:
        raise ValueError(f"--parallel must be a whole number of at least 1, not {text!r}")
    return int(text)


def running_vms(host: Host) -> list[str]:
    """The VMs to evacuate, by name (unique on a host), in domid order."""
    return [d.name for d in host.domains() if d.state == "running"]


@dataclass(frozen=True)
class Outcome:
    """One VM's result: its vm-migrate summary, or the reason it is still here."""
    vm: str
    summary: dict[str, Any] | None = None
    error: str | None = None

    def as_json(self) -> dict[str, Any]:
        return self.summary if self.summary is not None else {"status": "failed", "vm": self.vm,
                                                             "error": self.error}


@dataclass
class Child:
    vm: str
    proc: subprocess.Popen[str]
    started: float
    signalled: bool = False
    stderr: deque[str] = field(default_factory=lambda: deque(maxlen=STDERR_KEPT))


def _reason(child: Child, out: str) -> Outcome:
    """What a finished child did: its summary, else its own one error line."""
    code = child.proc.returncode
    if code == 0:
        try:
            return Outcome(child.vm, summary=json.loads(out.strip().splitlines()[-1]))
        except (ValueError, IndexError):
            return Outcome(child.vm, error=f"vm-migrate exited 0 without a JSON summary: {out[-200:]!r}")
    said = next((line[len(ERROR_PREFIX):] for line in reversed(child.stderr) if line.startswith(ERROR_PREFIX)),
                None)
    if said is not None:
        return Outcome(child.vm, error=said)
    if code < 0:
        return Outcome(child.vm, error=f"vm-migrate was killed by {signal.Signals(-code).name}")
    last = child.stderr[-1] if child.stderr else "no message"
    return Outcome(child.vm, error=f"vm-migrate exited {code}: {last}")


class Evacuation:
    """Runs one child per VM, at most `parallel` at once; `run` returns each VM's outcome in
    `vms` order. After SIGINT/SIGTERM, `cancelled` is that signal and the VMs not started are
    outcomes with NOT_STARTED."""

    def __init__(self, vms: list[str], argv: Callable[[str], list[str]], parallel: int,
                 progress: Callable[[str], None], relay: IO[str] | None = None) -> None:
        self.vms = vms
        self.argv = argv
        self.parallel = parallel
        self.progress = progress
        self.relay = relay          # where the children's stderr goes as it comes (-v), else kept only
        self.cancelled: int | None = None
        self._done: queue.Queue[tuple[Child, str]] = queue.Queue()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        """Only noted: the scheduler forwards it, so a child is never started unseen by it."""
        if self.cancelled is None:
            self.cancelled = signum

    def run(self) -> list[Outcome]:
        for sig in cancel.SIGNALS:
            signal.signal(sig, self._on_signal)
        try:
            outcomes = self._schedule()
        finally:
            cancel.install()
        return [outcomes[vm] for vm in self.vms]

    def _schedule(self) -> dict[str, Outcome]:
        pending = deque(self.vms)
        running: dict[str, Child] = {}
        outcomes: dict[str, Outcome] = {}
        while pending or running:
            while pending and len(running) < self.parallel and self.cancelled is None:
                vm = pending.popleft()
                running[vm] = self._start(vm, len(self.vms) - len(pending))
            if self.cancelled is not None:
                for child in running.values():
                    self._forward(child, self.cancelled)
                outcomes.update((vm, Outcome(vm, error=NOT_STARTED)) for vm in pending)
                pending.clear()
            try:
                child, out = self._done.get(timeout=WAKE_INTERVAL)
            except queue.Empty:
                continue
            del running[child.vm]
            outcomes[child.vm] = outcome = _reason(child, out)
            seconds = time.monotonic() - child.started
            self.progress(f"{child.vm}: migrated in {seconds:.2f} s" if outcome.summary is not None
                          else f"{child.vm}: failed after {seconds:.2f} s")
        return outcomes

    def _start(self, vm: str, number: int) -> Child:
        self.progress(f"{vm}: migrating ({number} of {len(self.vms)})")
        # Its own process group: a Ctrl-C on the terminal reaches this process only, which
        # forwards it once; a second signal in the child's clean-up could cut that short.
        proc = subprocess.Popen(self.argv(vm), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, process_group=0)
        child = Child(vm, proc, time.monotonic())
        threading.Thread(target=self._collect, args=(child,), name=f"evacuate-{vm}", daemon=True).start()
        return child

    def _collect(self, child: Child) -> None:
        """The child's stderr line by line (relayed with -v), then its summary on stdout."""
        assert child.proc.stdout is not None and child.proc.stderr is not None
        for line in child.proc.stderr:
            child.stderr.append(line.rstrip("\n"))
            if self.relay is not None:
                self.relay.write(f"[{child.vm}] {line}")
                self.relay.flush()
        out = child.proc.stdout.read()
        child.proc.wait()
        self._done.put((child, out))

    @staticmethod
    def _forward(child: Child, signum: int) -> None:
        if child.signalled:
            return
        child.signalled = True
        try:
            child.proc.send_signal(signum)
        except ProcessLookupError:
            pass


class EvacuationFailed(click.ClickException):
    """Some VMs were not evacuated: one line each, naming the VM and the reason."""
    exit_code = 2

    def __init__(self, failed: list[Outcome]) -> None:
        super().__init__("\n".join(f"VM {o.vm} not evacuated: {o.error}" for o in failed))

    def show(self, file: IO[Any] | None = None) -> None:
        for line in self.message.splitlines():
            click.echo(f"{ERROR_PREFIX}{line}", err=True)


@dataclass(frozen=True)
class Request:
    dest: str
    parallel: int
    shim_args: list[str]        # the parent's --root, --config, -v
    migrate_args: list[str]     # vm-migrate's options: --compress, --secret-file, ...

    def argv(self, vm: str) -> list[str]:
        """One VM's migration: this very xenopsd-shim, as the parent was started."""
        return [executable(SHIM), *self.shim_args, "vm-migrate", vm, "--dest", self.dest, "--json",
                *self.migrate_args]


def evacuate_host(host: Host, log: Logger, request: Request, as_json: bool,
                  describe: Callable[[str, str, dict[str, Any]], str]) -> None:
    """The command: the VMs migrated, the report printed (`describe`: vm-migrate's line for a
    migrated VM), EvacuationFailed if any VM is still here, Cancelled after a signal."""
    if policy.is_same_host(host, request.dest):
        raise ValueError(f"{request.dest} is this host's own serve: host-evacuate moves VMs to another host")

    def progress(text: str) -> None:
        log.info(f"host-evacuate: {text}")
        if not log.verbose:             # (-v: the log line is on stderr already)
            click.echo(text, err=True)

    vms = running_vms(host)
    if not vms:
        progress("no running VM to evacuate")
    t0 = time.monotonic()
    run = Evacuation(vms, request.argv, request.parallel, progress, relay=sys.stderr if log.verbose else None)
    outcomes = run.run()
    total = round(time.monotonic() - t0, 3)
    failed = [o for o in outcomes if o.summary is None]
    if as_json:
        click.echo(json.dumps({"dest": request.dest, "total_seconds": total, "parallel": request.parallel,
                               "vms": [o.as_json() for o in outcomes], "failed": [o.vm for o in failed]}))
    else:
        for o in outcomes:
            if o.summary is not None:
                click.echo(describe(o.vm, request.dest, o.summary))
        click.echo(f"evacuated {len(outcomes) - len(failed)} of {len(outcomes)} VMs to {request.dest} "
                   f"in {total:.2f} s ({request.parallel} at a time)")
    if run.cancelled is not None and failed:      # (a signal after the last child ended cancelled nothing)
        EvacuationFailed(failed).show()
        raise cancel.Cancelled(run.cancelled)
    if failed:
        raise EvacuationFailed(failed)
