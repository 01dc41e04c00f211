"""In-band compression while a migration runs: switches, pass reports, the adaptive policy.

The toolstack's half of this project's extension (docs/in-host-protocols.md).
A switch, from `vm-compress` or from the adaptive policy, goes to emu-manager
as a `xenmig-compress:` control line; emu-manager answers each in order, so
requests wait in a queue for their answers. xenguest's report of each pass
comes back the same way and is kept for the summary and the progress line.
"""
from __future__ import annotations

import threading
from collections import deque
from dataclasses import asdict, dataclass
from typing import Any, Callable

from xenmig import control as ctl

from .log import Logger

EMU = "xenguest"                # the emulator that compresses memory
ANSWER_TIMEOUT = 10.0           # emu-manager forwards at its next free moment: seconds, not minutes
# The adaptive policy's convergence watch: a pre-copy pass while which the guest dirtied at least
# this share of the pages it sent is not converging (the guest dirties as fast as the link carries).
NOT_CONVERGING = 0.9
# xenguest's per-pass delta figures (XENMIG_ITERATION) that add up over a migration.
DELTA_SUMS = ("delta_pages", "cache_hits", "cache_misses", "delta_saved_bytes")


class SwitchRefused(Exception):
    """The switch was not applied; the text says why, in one line."""


@dataclass
class Switch:
    """One switch applied, for the summary."""
    iteration: int      # the pass it applied to first (xenguest applies it from its next batch)
    mode: str
    level: int
    by: str             # "command" (vm-compress) or "policy" (adaptive)


class _Pending:
    def __init__(self, mode: str, by: str) -> None:
        self.mode, self.by = mode, by
        self.done = threading.Event()
        self.applied: Switch | None = None      # its answer: applied, or why not
        self.refused = "the migration ended before emu-manager answered"


@dataclass(frozen=True)
class ConvergenceWatch:
    """adaptive's rule: start with xenguest deciding per batch (`auto`); once the guest dirties
    nearly as many pages while a pre-copy pass is sent as the pass sent, the next pass will be as
    long: the link is slower than the guest dirties, and only fewer bytes per page can shorten
    what is left for the pause: compression goes `on` for every batch. Judged from each pass's
    own figures, since emu-manager (emum.c's rule) may pause the guest during the next one."""
    ratio: float = NOT_CONVERGING

    def not_converging(self, report: dict[str, Any]) -> bool:
        return report["dirty"] >= self.ratio * report["pages"] > 0


class InBand:
    """One migration's in-band compression: what was asked, applied and reported."""

    def __init__(self, log: Logger, *, start_mode: str | None = None, watch: ConvergenceWatch | None = None) -> None:
        self._send: Callable[[str], None] | None = None
        self.log = log
        self.start_mode = start_mode
        self.watch = watch
        self.passes: list[dict[str, Any]] = []      # xenguest's report of each pass
        self.switches: list[Switch] = []
        self._pending: deque[_Pending] = deque()
        self._lock = threading.Lock()
        self._closed = False
        self._watched = False       # the watch acts once, and only while pre-copy runs

    # -- asking ------------------------------------------------------------------------
    def attach(self, send: Callable[[str], None]) -> None:
        """emu-manager runs: switches go to it from now on; the policy's first word goes now (it
        holds it until xenguest is initialised)."""
        self._send = send
        if self.start_mode is not None:
            self._ask(self.start_mode, None, "policy")

    def switch(self, mode: str, level: int | None, timeout: float = ANSWER_TIMEOUT) -> Switch:
        """Switch from another thread (vm-compress); waits for emu-manager's answer."""
        pending = self._ask(mode, level, "command")
        if not pending.done.wait(timeout):
            raise SwitchRefused(f"emu-manager did not answer within {timeout:g} s")
        if pending.applied is None:
            raise SwitchRefused(pending.refused)
        return pending.applied

    def _ask(self, mode: str, level: int | None, by: str) -> _Pending:
        line = ctl.compress_request(EMU, mode, level)
        pending = _Pending(mode, by)
        with self._lock:
            if self._closed:
                raise SwitchRefused("the migration's memory has been sent")
            if self._send is None:
                raise SwitchRefused("the migration is not sending memory yet")
            self._pending.append(pending)
            self._send(line)
        return pending

    # -- what emu-manager says ---------------------------------------------------------
    def take(self, line: str) -> bool:
        """A report of ours from emu-manager: True if it was one (kept), False if not."""
        answer = ctl.parse_compress_answer(line)
        if answer is not None:
            self._answered(answer)
            return True
        report = ctl.parse_iteration(line)
        if report is not None:
            self._reported(report[1])
            return True
        return False

    def _answered(self, answer: ctl.CompressAnswer) -> None:
        with self._lock:
            if not self._pending:
                raise ctl.ControlError("protocol error: a compression answer nobody asked for")
            pending = self._pending.popleft()
        if answer.refused is None and answer.mode is not None and answer.level is not None:
            pending.applied = Switch(len(self.passes), answer.mode, answer.level, pending.by)
            self.switches.append(pending.applied)
            self.log.info(f"in-band compression {answer.mode} (level {answer.level}) from pass {len(self.passes)}, "
                          f"by {pending.by}")
        else:
            pending.refused = answer.refused or "refused"
            self.log.info(f"in-band compression switch to {pending.mode} refused: {answer.refused}")
        pending.done.set()

    def _reported(self, figures: dict[str, Any]) -> None:
        self.passes.append(figures)
        if self.watch is not None and not self._watched and figures["mode"] == "auto" \
                and self.watch.not_converging(figures):
            self._watched = True
            self.log.info(f"pre-copy is not converging (pass {figures['iteration']} sent {figures['pages']} pages, "
                          f"the guest dirtied {figures['dirty']} meanwhile): in-band compression on")
            self._ask("on", None, "policy")

    def paused(self) -> None:
        """Pre-copy is over: the final pass is no sign of convergence either way."""
        self._watched = True

    def close(self) -> None:
        """The memory is sent: later switches are refused, waiting ones released."""
        with self._lock:
            self._closed = True
            pending, self._pending = list(self._pending), deque()
        for p in pending:
            p.done.set()

    # -- what the user sees ------------------------------------------------------------
    def state(self) -> str:
        """For the progress line: the mode in force and how the last pass went."""
        switch = self.switches[-1] if self.switches else None
        if switch is not None and switch.iteration >= len(self.passes):
            return f"compression {switch.mode} (level {switch.level}) from pass {switch.iteration}"
        if self.passes:
            last = self.passes[-1]
            batches = last["compressed_batches"] + last["plain_batches"]
            return f"compression {last['mode']}: {last['compressed_batches']}/{batches} batches compressed " \
                   f"in pass {last['iteration']}"
        return ""

    def delta_totals(self) -> dict[str, int]:
        """The delta cache's figures over every pass (its peak, the others summed)."""
        return {"cache_peak_bytes": max((p.get("cache_peak_bytes", 0) for p in self.passes), default=0),
                **{name: sum(p.get(name, 0) for p in self.passes) for name in DELTA_SUMS}}

    def summary(self) -> dict[str, Any]:
        return {"iteration_stats": self.passes, "compression_switches": [asdict(s) for s in self.switches]}
