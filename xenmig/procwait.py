"""Waiting for a child process to exit, event-driven (pidfd), with its CPU time.

`subprocess.Popen.wait(timeout)` polls with sleeps of up to 50 ms, which
every hop of the process chain (xenopsd -> emu-manager -> emulator) adds to
a migration's tail. A pidfd becomes readable the moment the child exits, so
waiting on it costs nothing; reaping with wait4 also gives the child's
resource usage, which is how CPU is accounted per process role (no /proc
sampling). Shared by xenopsd-shim and emu-manager.
"""
from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
from dataclasses import dataclass


@dataclass(frozen=True)
class Exit:
    """How a child ended: `code` as Popen.returncode (-N: killed by signal N); `cpu` its user +
    system seconds, including those of the children it reaped itself (wait4's RUSAGE_BOTH)."""
    code: int
    cpu: float


def _reap(proc: subprocess.Popen) -> Exit:
    """Reap an exited child with wait4, telling Popen its status (it must not reap it again)."""
    with proc._waitpid_lock:     # Popen's own lock: no poll() of another thread reaps it meanwhile
        if proc.returncode is not None:       # reaped by Popen already: its rusage is lost
            return Exit(proc.returncode, 0.0)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    return Exit(proc.returncode, usage.ru_utime + usage.ru_stime)


def wait_exit(proc: subprocess.Popen, timeout: float | None) -> Exit | None:
    """Wait up to `timeout` seconds (None: for ever) for the child to exit and reap it; None if
    it still runs. Wakes the moment it exits (pidfd), never on a timer."""
    if proc.returncode is not None:
        return Exit(proc.returncode, 0.0)
    try:
        pidfd = os.pidfd_open(proc.pid)
    except ProcessLookupError:       # already reaped (by Popen's own poll)
        proc.wait()
        return Exit(proc.returncode, 0.0)
    try:
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)
        if not poller.poll(None if timeout is None else max(0, int(timeout * 1000 + 0.999))):
            return None
    finally:
        os.close(pidfd)
    return _reap(proc)


def wait_or_kill(proc: subprocess.Popen, timeout: float | None) -> Exit:
    """Wait up to `timeout` for the child to exit; SIGKILL it after that, and reap it."""
    ended = wait_exit(proc, timeout)
    if ended is not None:
        return ended
    try:
        proc.send_signal(signal.SIGKILL)
    except ProcessLookupError:
        pass
    ended = wait_exit(proc, None)
    assert ended is not None
    return ended


def exit_now(code: int) -> None:
    """End this process with `code` once its work is done and reported: standard streams flushed,
    the interpreter's teardown (module and thread-pool finalisation, tens of ms that the parent
    waiting on us would add to a migration's tail) skipped. Only for a process whose run has
    released all it holds that outlives it (sockets unlinked, children reaped)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)
