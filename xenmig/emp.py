"""EMP, the emu-manager protocol: JSON objects over a Unix stream socket.

Framed by JSON value, not by line: the real emu-manager writes each request
as bare JSON with no terminator and parses what comes back as a stream of
JSON values (em-client.c, em_client_send_cmd / em_client_read with a
json_tokener), so a reader must never wait for a newline. We write bare
JSON too. A value still incomplete after MAX_MESSAGE bytes is an error, so
a hostile peer cannot grow our memory. A file descriptor travels as
SCM_RIGHTS in the same sendmsg as the request that names it
(`migrate_init`); the receiver attaches the fds of a read to the first
message completed by that read, which is exact because a requester waits
for each reply before its next request.
"""
from __future__ import annotations

import json
import select
import socket
import threading
import time
from typing import Any, Mapping

MAX_MESSAGE = 64 << 10
MAX_FDS = 4

# Requests (emu-manager -> emulator)
CMD_SET_ARGS = "set_args"
CMD_MIGRATE_INIT = "migrate_init"
CMD_TRACK_DIRTY = "track_dirty"
CMD_MIGRATE_PROGRESS = "migrate_progress"
CMD_MIGRATE_LIVE = "migrate_live"
CMD_MIGRATE_PAUSE = "migrate_pause"
CMD_MIGRATE_PAUSED = "migrate_paused"
CMD_MIGRATE_NONLIVE = "migrate_nonlive"
CMD_MIGRATE_ABORT = "migrate_abort"
CMD_RESTORE = "restore"
CMD_QUIT = "quit"
# This project's extension (docs/in-host-protocols.md): switch an emulator's in-band compression
# mid-save; arguments "mode" (off/on/auto) and optionally "level", strings as every EMP argument.
# Its reply carries the mode and the level now in force: {"return": {"mode": M, "level": "L"}}.
CMD_XENMIG_COMPRESS = "xenmig_compress"
COMMANDS = (CMD_SET_ARGS, CMD_MIGRATE_INIT, CMD_TRACK_DIRTY, CMD_MIGRATE_PROGRESS, CMD_MIGRATE_LIVE,
            CMD_MIGRATE_PAUSE, CMD_MIGRATE_PAUSED, CMD_MIGRATE_NONLIVE, CMD_MIGRATE_ABORT, CMD_RESTORE,
            CMD_QUIT, CMD_XENMIG_COMPRESS)

EVENT_MIGRATION = "MIGRATION"
STATUS_COMPLETED = "completed"
STATUS_FAILED = "failed"
# This project's extension (docs/in-host-protocols.md): xenguest's figures of a save, sent once,
# just before its completion event, so that they reach the toolstack as a message.
EVENT_SAVE_STATS = "XENMIG_SAVE_STATS"
SAVE_STATS_FIELDS = ("iterations", "pages", "zero_pages", "bytes")
# Also ours: xenguest's figures of each pass (pre-copy and final), sent as the pass ends.
EVENT_ITERATION = "XENMIG_ITERATION"
# `dirty`: the pages the guest dirtied while the pass was sent (what the next pass must send):
# the toolstack judges pre-copy's convergence from it before emu-manager's rule ends pre-copy.
# The delta cache's (0 without one): pages sent as DELTA_PAGE_DATA, re-sent pages whose base the
# cache held or not, the bytes it holds at the pass's end and at most so far, and the wire bytes the
# deltas saved against the same pages compressed (an estimate: docs/delta-page-data.md).
ITERATION_DELTA = ("delta_pages", "cache_hits", "cache_misses", "cache_bytes", "cache_peak_bytes",
                   "delta_saved_bytes")
ITERATION_COUNTS = ("iteration", "pages", "dirty", "wire_bytes", "compressed_batches", "plain_batches",
                    "compress_pages", *ITERATION_DELTA)
ITERATION_RATES = ("link_mbps", "compress_mbps")        # MB/s, or null when not measured
ITERATION_FIELDS = (*ITERATION_COUNTS, "levels", "mode", *ITERATION_RATES)
# The in-band encoder's modes (xenguest `-compress true` starts in on, otherwise off; xenmig_compress
# switches them mid-save): plain PAGE_DATA, every batch compressed, or per batch from measurements.
MODE_OFF, MODE_ON, MODE_AUTO = "off", "on", "auto"
COMPRESS_MODES = (MODE_OFF, MODE_ON, MODE_AUTO)
# The zstd levels a switch may ask for: the fast (negative) levels down to -7, the normal ones up to
# 19 (20-22, "ultra", want windows beyond a record's 4 MiB and are far too slow for a migration).
MIN_LEVEL, MAX_LEVEL = -7, 19


class EmpError(Exception):
    """The peer broke the protocol, closed the socket, or did not answer in time."""


def request(command: str, **arguments: str) -> dict[str, Any]:
    return {"execute": command, "arguments": {k: str(v) for k, v in arguments.items()}}


def reply_ok(values: Mapping[str, str] | None = None) -> dict[str, Any]:
    return {"return": dict(values or {})}


def reply_error(text: str) -> dict[str, Any]:
    return {"error": text}


def progress_event(sent: int, remaining: int, iteration: int) -> dict[str, Any]:
    return {"event": EVENT_MIGRATION, "data": {"sent": sent, "remaining": remaining, "iteration": iteration}}


def completion_event(result: str) -> dict[str, Any]:
    return {"event": EVENT_MIGRATION, "data": {"status": STATUS_COMPLETED, "result": result}}


def failure_event(error: str) -> dict[str, Any]:
    return {"event": EVENT_MIGRATION, "data": {"status": STATUS_FAILED, "error": error}}


def save_stats_event(figures: Mapping[str, int]) -> dict[str, Any]:
    return {"event": EVENT_SAVE_STATS, "data": {key: figures[key] for key in SAVE_STATS_FIELDS}}


def parse_save_stats(data: Any) -> dict[str, int]:
    """A save-statistics event's data (or the control line that forwards it): exactly the
    fields of SAVE_STATS_FIELDS, each an integer."""
    if not isinstance(data, dict) or set(data) != set(SAVE_STATS_FIELDS) \
            or not all(type(value) is int for value in data.values()):
        raise EmpError(f"malformed save statistics {str(data)[:120]}")
    return {key: data[key] for key in SAVE_STATS_FIELDS}


def parse_compress_mode(mode: Any, level: Any = None) -> tuple[str, int | None]:
    """A requested mode and optional level (a string or an int), checked: ValueError, one line."""
    if mode not in COMPRESS_MODES:
        raise ValueError(f"unknown compression mode {str(mode)[:40]!r} (one of {', '.join(COMPRESS_MODES)})")
    if level is None:
        return mode, None
    text = str(level)
    if not text.lstrip("-").isdigit() or not MIN_LEVEL <= int(text) <= MAX_LEVEL:
        raise ValueError(f"bad compression level {text[:40]!r} (an integer {MIN_LEVEL}..{MAX_LEVEL})")
    return mode, int(text)


def compress_request(mode: str, level: int | None = None) -> dict[str, Any]:
    return request(CMD_XENMIG_COMPRESS, mode=mode, **({} if level is None else {"level": str(level)}))


def compress_reply(mode: str, level: int) -> dict[str, Any]:
    return reply_ok({"mode": mode, "level": str(level)})


def parse_compress_reply(reply: Any) -> tuple[str, int]:
    """(mode, level) of a successful xenmig_compress reply."""
    values = reply.get("return") if isinstance(reply, dict) else None
    if not isinstance(values, dict) or set(values) != {"mode", "level"} or values["mode"] not in COMPRESS_MODES \
            or not isinstance(values["level"], str) or not values["level"].lstrip("-").isdigit():
        raise EmpError(f"malformed {CMD_XENMIG_COMPRESS} reply {str(reply)[:120]}")
    return values["mode"], int(values["level"])


def iteration_event(figures: Mapping[str, Any]) -> dict[str, Any]:
    return {"event": EVENT_ITERATION, "data": parse_iteration(dict(figures))}


def _is_count(value: Any) -> bool:
    return type(value) is int and value >= 0


def _is_rate(value: Any) -> bool:
    return value is None or (type(value) in (int, float) and 0 <= value < float("inf"))


def parse_iteration(data: Any) -> dict[str, Any]:
    """A pass's figures (the event's data, or the control line that forwards it): exactly
    ITERATION_FIELDS; counts non-negative integers, levels a sorted list of integers, mode one of
    COMPRESS_MODES, rates non-negative numbers or null."""
    if not isinstance(data, dict) or set(data) != set(ITERATION_FIELDS) \
            or not all(_is_count(data[key]) for key in ITERATION_COUNTS) \
            or not all(_is_rate(data[key]) for key in ITERATION_RATES) \
            or data["mode"] not in COMPRESS_MODES or not isinstance(data["levels"], list) \
            or not all(type(level) is int for level in data["levels"]) or data["levels"] != sorted(data["levels"]):
        raise EmpError(f"malformed iteration figures {str(data)[:160]}")
    return {key: data[key] for key in ITERATION_FIELDS}


_WHITESPACE = b" \t\r\n"
_OPEN, _CLOSE, _QUOTE, _ESCAPE = b"{"[0], b"}"[0], b'"'[0], b"\\"[0]
_NESTING = {b"{"[0]: 1, b"["[0]: 1, b"}"[0]: -1, b"]"[0]: -1}


def frame_end(buf: bytes | bytearray, start: int = 0) -> int | None:
    """Where the JSON object starting at `start` (after whitespace) ends, or None while it is
    incomplete. Only the outline is walked here (nesting, strings, escapes); json.loads checks
    the rest. A top-level value that is not an object is refused at its first byte."""
    i = start
    while i < len(buf) and buf[i] in _WHITESPACE:
        i += 1
    if i == len(buf):
        return None
    if buf[i] != _OPEN:
        raise EmpError(f"EMP message is not a JSON object: {bytes(buf[i:i + 40])!r}")
    depth, in_string, escaped = 0, False, False
    for j in range(i, len(buf)):
        c = buf[j]
        if in_string:
            if escaped:
                escaped = False
            elif c == _ESCAPE:
                escaped = True
            elif c == _QUOTE:
                in_string = False
        elif c == _QUOTE:
            in_string = True
        else:
            depth += _NESTING.get(c, 0)
            if depth == 0:
                return j + 1
    return None


class Channel:
    """A framed, thread-safe-for-sending EMP connection."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._buf = bytearray()
        self._fds: list[int] = []
        self._send_lock = threading.Lock()

    def send(self, message: dict[str, Any], fds: list[int] | None = None) -> None:
        data = json.dumps(message, separators=(",", ":")).encode()     # bare, as em-client.c writes
        with self._send_lock:
            try:
                if fds:
                    socket.send_fds(self.sock, [data], fds)
                else:
                    self.sock.sendall(data)
            except OSError as e:
                raise EmpError(f"EMP send failed: {e.strerror or e}") from None

    def _frame(self) -> int | None:
        end = frame_end(self._buf)
        if end is None and len(self._buf) > MAX_MESSAGE:
            raise EmpError(f"EMP message longer than {MAX_MESSAGE} bytes")
        return end

    def recv(self, timeout: float | None = None) -> tuple[dict[str, Any], list[int]]:
        """The next message and any fds that came with it."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while (end := self._frame()) is None:
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready, _, _ = select.select([self.sock], [], [], wait)
            if not ready:
                raise EmpError(f"no EMP message within {timeout:g} s")
            try:
                data, fds, _flags, _addr = socket.recv_fds(self.sock, MAX_MESSAGE, MAX_FDS)
            except OSError as e:
                raise EmpError(f"EMP receive failed: {e.strerror or e}") from None
            if not data:
                raise EmpError("EMP peer closed the connection")
            self._buf += data
            self._fds += fds
        value = bytes(self._buf[:end])
        del self._buf[:end]
        fds, self._fds = self._fds, []
        try:
            message = json.loads(value)
        except ValueError:
            raise EmpError(f"EMP message is not JSON: {value[:80]!r}") from None
        return message, fds

    def has_message(self) -> bool:
        """A whole message is already buffered (a malformed one counts: recv reports it)."""
        try:
            return self._frame() is not None
        except EmpError:
            return True

    def close(self) -> None:
        self.sock.close()
