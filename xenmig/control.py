"""The xenopsd <-> emu-manager control protocol: `\\n`-terminated text lines.

Shared by both ends (emu-manager and xenopsd-shim), so the message table
lives in one place.
"""
from __future__ import annotations

import json
import os
import select
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from . import emp

# emu-manager -> xenopsd
MSG_SUSPEND = "suspend:"
MSG_PREPARE = "prepare:"          # + emulator name
MSG_INFO = "info:"                # + "\\b\\b\\b\\b" + percent
INFO_PREFIX = "info:" + "\\b" * 4
MSG_RESULT = "result:"            # "result:0 0" on save; "result:xenguest S C" / "result:vgpu" on restore
MSG_ERROR = "error:"              # + "[<emu> ]<text>"
# This project's extension, an `info:` the real xenopsd only logs (it reads progress from info:
# lines that start with INFO_PREFIX): an emulator's save statistics, before "result:".
MSG_SAVE_STATS = MSG_INFO + "xenmig-save-stats:"   # + emulator name + " " + JSON object
# Also ours, likewise only logged by the real xenopsd: an emulator's CPU seconds (user + system, from
# wait4 when emu-manager reaped it), after "result:" and before emu-manager exits, so that xenopsd
# can tell emu-manager's own CPU from its emulators' without sampling /proc.
MSG_CPU = MSG_INFO + "xenmig-cpu:"                 # + emulator name + " " + seconds
# Ours too (docs/in-host-protocols.md): the answers to a compression switch, and each pass's figures.
MSG_COMPRESS_APPLIED = MSG_INFO + "xenmig-compress:"            # + emulator + " " + mode + " " + level
MSG_COMPRESS_REFUSED = MSG_INFO + "xenmig-compress-refused:"    # + emulator + " " + one-line reason
MSG_ITERATION = MSG_INFO + "xenmig-iteration:"                  # + emulator + " " + JSON object
# xenopsd -> emu-manager
MSG_DONE = "done"
MSG_RESTORE = "restore:"          # + emulator name
MSG_ABORT = "abort"
# Our extension: switch an emulator's in-band compression (no `done` follows).
MSG_COMPRESS = "xenmig-compress:"                               # + emulator + " " + mode [+ " " + level]

MAX_LINE = 4096


class ControlError(Exception):
    """The peer broke the control protocol, went away, or was too slow."""


class ControlTimeout(ControlError):
    """No line within the time asked for (the peer may just be busy)."""


def info(percent: int) -> str:
    return f"{INFO_PREFIX}{percent}"


def parse_info(line: str) -> int | None:
    if line.startswith(INFO_PREFIX) and line[len(INFO_PREFIX):].isdigit():
        return int(line[len(INFO_PREFIX):])
    return None


def _figures_line(prefix: str, emu: str, figures: dict, check: Callable[[Any], dict]) -> str:
    """An emulator's figures, forwarded from its EMP event: prefix, emulator, one JSON object."""
    return f"{prefix}{emu} {json.dumps(check(figures), separators=(',', ':'))}"


def _parse_figures_line(line: str, prefix: str, check: Callable[[Any], dict],
                        what: str) -> tuple[str, dict] | None:
    """(emulator, figures) of a line of `_figures_line`'s kind; None for any other line."""
    if not line.startswith(prefix):
        return None
    emu, _, text = line[len(prefix):].partition(" ")
    try:
        if not emu:
            raise ValueError(emu)
        return emu, check(json.loads(text))
    except (ValueError, emp.EmpError):
        raise ControlError(f"protocol error: malformed {what} {line!r}") from None


def save_stats(emu: str, figures: Mapping[str, int]) -> str:
    """emu-manager forwards an emulator's EMP save-statistics event as this line."""
    return _figures_line(MSG_SAVE_STATS, emu, dict(figures), emp.parse_save_stats)


def parse_save_stats(line: str) -> tuple[str, dict[str, int]] | None:
    """(emulator, figures) of a save-statistics line; None for any other line."""
    return _parse_figures_line(line, MSG_SAVE_STATS, emp.parse_save_stats, "save statistics")


def cpu(emu: str, seconds: float) -> str:
    """emu-manager reports an emulator's CPU seconds, once it has reaped it, as this line."""
    return f"{MSG_CPU}{emu} {seconds:.3f}"


def parse_cpu(line: str) -> tuple[str, float] | None:
    """(emulator, CPU seconds) of a CPU line; None for any other line."""
    if not line.startswith(MSG_CPU):
        return None
    emu, _, text = line[len(MSG_CPU):].partition(" ")
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not emu or not 0 <= seconds < float("inf"):
        raise ControlError(f"protocol error: malformed CPU report {line!r}")
    return emu, seconds


def compress_request(emu: str, mode: str, level: int | None = None) -> str:
    """xenopsd asks emu-manager to switch an emulator's compression with this line."""
    emp.parse_compress_mode(mode, level)
    return f"{MSG_COMPRESS}{emu} {mode}" + ("" if level is None else f" {level}")


def parse_compress_request(argument: str) -> tuple[str, str, int | None]:
    """(emulator, mode, level or None) of what follows `xenmig-compress:`; ValueError, one line."""
    words = argument.split(" ")
    if len(words) not in (2, 3) or not words[0]:
        raise ValueError(f"malformed request {argument[:80]!r} (expected <emu> <mode>[ <level>])")
    mode, level = emp.parse_compress_mode(words[1], words[2] if len(words) == 3 else None)
    return words[0], mode, level


def compress_applied(emu: str, mode: str, level: int) -> str:
    return f"{MSG_COMPRESS_APPLIED}{emu} {mode} {level}"


def compress_refused(emu: str, reason: str) -> str:
    return f"{MSG_COMPRESS_REFUSED}{emu} " + " ".join(reason.split())[:MAX_LINE // 2]


@dataclass(frozen=True)
class CompressAnswer:
    emu: str
    mode: str | None = None         # applied: the mode and the level now in force
    level: int | None = None
    refused: str | None = None      # refused: why


def parse_compress_answer(line: str) -> CompressAnswer | None:
    """emu-manager's answer to a compression switch; None for any other line."""
    if line.startswith(MSG_COMPRESS_REFUSED):
        emu, _, reason = line[len(MSG_COMPRESS_REFUSED):].partition(" ")
        if emu and reason:
            return CompressAnswer(emu, refused=reason)
    elif line.startswith(MSG_COMPRESS_APPLIED):
        try:
            emu, mode, level = parse_compress_request(line[len(MSG_COMPRESS_APPLIED):])
        except ValueError:
            level = None
        if level is not None:
            return CompressAnswer(emu, mode, level)
    else:
        return None
    raise ControlError(f"protocol error: malformed compression answer {line!r}")


def iteration(emu: str, figures: Mapping[str, Any]) -> str:
    """emu-manager forwards an emulator's EMP iteration event as this line."""
    return _figures_line(MSG_ITERATION, emu, dict(figures), emp.parse_iteration)


def parse_iteration(line: str) -> tuple[str, dict[str, Any]] | None:
    """(emulator, one pass's figures) of an iteration line; None for any other line."""
    return _parse_figures_line(line, MSG_ITERATION, emp.parse_iteration, "iteration figures")


class LineChannel:
    """Reads and writes whole lines on two fds, with timeouts on reads."""

    def __init__(self, infd: int, outfd: int) -> None:
        self.infd = infd
        self.outfd = outfd
        self._buf = b""

    def send(self, line: str) -> None:
        data = (line + "\n").encode()
        while data:
            try:
                n = os.write(self.outfd, data)
            except OSError as e:
                raise ControlError(f"control write failed: {e.strerror}") from None
            data = data[n:]

    def has_line(self) -> bool:
        return b"\n" in self._buf

    def fill(self) -> None:
        """Read what is available (call when select says the fd is readable)."""
        try:
            data = os.read(self.infd, MAX_LINE)
        except OSError as e:
            raise ControlError(f"control read failed: {e.strerror}") from None
        if not data:
            raise ControlError("control channel closed by peer")
        self._buf += data
        if len(self._buf) > MAX_LINE and b"\n" not in self._buf:
            raise ControlError("control line too long")

    def pop(self) -> str:
        line, _, self._buf = self._buf.partition(b"\n")
        return line.decode(errors="replace")

    def recv(self, timeout: float | None) -> str:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.has_line():
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready, _, _ = select.select([self.infd], [], [], wait)
            if not ready:
                raise ControlTimeout(f"no control message within {timeout:g} s")
            self.fill()
        return self.pop()
