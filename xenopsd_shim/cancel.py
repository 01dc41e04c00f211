"""SIGINT, SIGTERM, SIGHUP and SIGQUIT cancel a command the same way: each raises `Cancelled`
in the main thread.

A service manager stops a process with SIGTERM, a person with Ctrl-C (SIGINT) or Ctrl-\\
(SIGQUIT), a closed terminal or ssh session with SIGHUP; each must take the clean-up path (a
migration aborted and its VM resumed on the source, a half-built domain destroyed), never the
default death that skips it (left a VM paused on the source for good, and its control socket).
"""
from __future__ import annotations

import signal
from types import FrameType

SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)


class Cancelled(BaseException):
    """The command was cancelled by a signal; its exit status is 128 + the signal number.

    Like KeyboardInterrupt, no `except Exception` stops it; unlike it, click does not turn it
    into an Abort with a blank line, so the user sees one line."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    @property
    def signame(self) -> str:
        return signal.Signals(self.signum).name


def _raise(signum: int, frame: FrameType | None) -> None:
    raise Cancelled(signum)


def install() -> None:
    for sig in SIGNALS:
        signal.signal(sig, _raise)


def ignore() -> None:
    """While a cancellation is being cleaned up, a second signal must not cut the clean-up short."""
    for sig in SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
