"""EMP, the emu-manager protocol: JSON objects over a Unix stream socket.

One object per line. A file descriptor travels as SCM_RIGHTS in the same
sendmsg as the request that names it (`migrate_init`); the receiver attaches
the fds of a read to the first message completed by that read, which is
exact because a requester waits for each reply before its next request.
"""
from __future__ import annotations

import json
import select
import socket
import threading
import time
from typing import Any

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
COMMANDS = (CMD_SET_ARGS, CMD_MIGRATE_INIT, CMD_TRACK_DIRTY, CMD_MIGRATE_PROGRESS, CMD_MIGRATE_LIVE,
            CMD_MIGRATE_PAUSE, CMD_MIGRATE_PAUSED, CMD_MIGRATE_NONLIVE, CMD_MIGRATE_ABORT, CMD_RESTORE,
            CMD_QUIT)

EVENT_MIGRATION = "MIGRATION"
STATUS_COMPLETED = "completed"
STATUS_FAILED = "failed"


class EmpError(Exception):
    """The peer broke the protocol, closed the socket, or did not answer in time."""


def request(command: str, **arguments: str) -> dict[str, Any]:
    return {"execute": command, "arguments": {k: str(v) for k, v in arguments.items()}}


def reply_ok() -> dict[str, Any]:
    return {"return": {}}


def reply_error(text: str) -> dict[str, Any]:
    return {"error": text}


def progress_event(sent: int, remaining: int, iteration: int) -> dict[str, Any]:
    return {"event": EVENT_MIGRATION, "data": {"sent": sent, "remaining": remaining, "iteration": iteration}}


def completion_event(result: str) -> dict[str, Any]:
    return {"event": EVENT_MIGRATION, "data": {"status": STATUS_COMPLETED, "result": result}}


def failure_event(error: str) -> dict[str, Any]:
    return {"event": EVENT_MIGRATION, "data": {"status": STATUS_FAILED, "error": error}}


class Channel:
    """A framed, thread-safe-for-sending EMP connection."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._buf = bytearray()
        self._fds: list[int] = []
        self._send_lock = threading.Lock()

    def send(self, message: dict[str, Any], fds: list[int] | None = None) -> None:
        data = json.dumps(message, separators=(",", ":")).encode() + b"\n"
        with self._send_lock:
            try:
                if fds:
                    socket.send_fds(self.sock, [data], fds)
                else:
                    self.sock.sendall(data)
            except OSError as e:
                raise EmpError(f"EMP send failed: {e.strerror or e}") from None

    def recv(self, timeout: float | None = None) -> tuple[dict[str, Any], list[int]]:
        """The next message and any fds that came with it."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while b"\n" not in self._buf:
            if len(self._buf) > MAX_MESSAGE:
                raise EmpError("EMP message too long")
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
        line, _, rest = bytes(self._buf).partition(b"\n")
        self._buf = bytearray(rest)
        fds, self._fds = self._fds, []
        try:
            message = json.loads(line)
        except ValueError:
            raise EmpError(f"EMP message is not JSON: {line[:80]!r}") from None
        if not isinstance(message, dict):
            raise EmpError("EMP message is not a JSON object")
        return message, fds

    def has_message(self) -> bool:
        return b"\n" in self._buf

    def close(self) -> None:
        self.sock.close()
