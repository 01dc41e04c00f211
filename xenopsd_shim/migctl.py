"""A running migration's control socket: how `vm-compress` reaches `vm-migrate`.

xenopsd takes such calls on its own API; here the `vm-migrate` process of a
domain listens on a Unix socket in the host's run dir (Host.migration_socket)
while it sends the domain's memory. One request per connection, one line
each way (docs/in-host-protocols.md):

    compress <off|on|auto>[ <level>]      ->  ok <mode> <level> <pass>   |   refused <reason>
"""
from __future__ import annotations

import os
import socket
import threading
from pathlib import Path
from typing import Callable

from xenmig import emp

MAX_REQUEST = 256
MAX_UNREAD = 64 << 10           # what is read and dropped after an overlong request's answer
CLIENT_TIMEOUT = 5.0            # a client that does not send its line in this time is dropped
COMMAND_COMPRESS = "compress"
OK, REFUSED = "ok", "refused"


class ControlSocketError(Exception):
    """The request could not be made or was refused; the text is the one line to show."""


def parse_request(line: str) -> tuple[str, int | None]:
    """(mode, level or None) of a compress request; ValueError with the reason if malformed."""
    words = line.split()
    if not words or words[0] != COMMAND_COMPRESS or len(words) not in (2, 3):
        raise ValueError(f"malformed request {line[:80]!r} (expected: compress off|on|auto [LEVEL])")
    return emp.parse_compress_mode(words[1], words[2] if len(words) == 3 else None)


def _read_line(sock: socket.socket) -> str:
    """One line of at most MAX_REQUEST bytes (what came, if the peer stopped short)."""
    data = b""
    while b"\n" not in data and len(data) <= MAX_REQUEST:
        chunk = sock.recv(MAX_REQUEST)
        if not chunk:
            break
        data += chunk
    return data.partition(b"\n")[0].decode(errors="replace")


def _discard_unread(conn: socket.socket) -> None:
    """Read what a client sent beyond its line (an overlong request): a Unix socket closed with
    unread data resets the client, which would lose its answer."""
    conn.setblocking(False)
    try:
        for _ in range(MAX_UNREAD // MAX_REQUEST):
            if not conn.recv(MAX_REQUEST):
                return
    except BlockingIOError:
        pass


Handler = Callable[[str, int | None], str]      # (mode, level) -> the "ok ..." line; raises with a reason


class ControlServer:
    """Serves requests on a thread until closed; one connection at a time (a switch waits for
    emu-manager's answer anyway)."""

    def __init__(self, path: Path, handle: Handler) -> None:
        self.path = path
        self.handle = handle
        path.unlink(missing_ok=True)        # a dead vm-migrate's; the domain's one migration owns the name
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(str(path))
        os.chmod(path, 0o600)
        self._sock.listen(4)
        self._thread = threading.Thread(target=self._serve, name="migration-control", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return                      # closed
            with conn:
                self._one(conn)

    def _one(self, conn: socket.socket) -> None:
        conn.settimeout(CLIENT_TIMEOUT)
        try:
            try:
                mode, level = parse_request(_read_line(conn))
                answer = self.handle(mode, level)
            except Exception as e:  # noqa: BLE001 - the client gets one line, the migration goes on
                answer = f"{REFUSED} {str(e).splitlines()[0] if str(e) else type(e).__name__}"
            conn.sendall((answer + "\n").encode())
            _discard_unread(conn)
        except OSError:
            pass                            # the client went away or was too slow: its loss

    def close(self) -> None:
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
        self._thread.join(timeout=5)
        self.path.unlink(missing_ok=True)


def request(path: Path, mode: str, level: int | None, timeout: float) -> str:
    """vm-compress's side: the "ok ..." answer's words after "ok", or ControlSocketError."""
    line = f"{COMMAND_COMPRESS} {mode}" + ("" if level is None else f" {level}")
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(path))
            sock.sendall((line + "\n").encode())
            answer = _read_line(sock)
    except (FileNotFoundError, ConnectionRefusedError):
        raise ControlSocketError("it is not migrating") from None
    except OSError as e:
        raise ControlSocketError(f"its migration did not answer: {e.strerror or e}") from None
    word, _, rest = answer.partition(" ")
    if word == OK and rest:
        return rest
    if word == REFUSED:
        raise ControlSocketError(rest)
    raise ControlSocketError(f"its migration answered {answer[:80]!r}")
