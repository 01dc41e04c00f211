"""`serve`'s listening socket: accepts connections without letting a flood of them take it down.

A connection costs a thread only once its first byte arrives; until then it waits
here, in one selector, for at most the request timeout. The connections held
(waiting here or handled) are bounded: at the bound the oldest one still silent
makes room for a new one (a flood of idle connections cannot lock a sender out),
and with none silent the new one is closed at once. Running out of fds in
accept() is survived the same way, with a spare fd to accept and close the
excess when nothing can be evicted. Each burst of refusals is one log line.
"""
from __future__ import annotations

import errno
import os
import resource
import selectors
import socket
import time
from collections import OrderedDict
from typing import Callable

from .log import Logger
from .transport import format_address

# accept() errors that say the process or system is out of fds or memory, not that the listener broke.
OUT_OF_FDS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
# accept() errors about one connection that went away before it was taken.
CONNECTION_GONE = (errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.ENETDOWN, errno.ENOPROTOOPT,
                   errno.EHOSTDOWN, errno.ENONET, errno.EHOSTUNREACH, errno.EOPNOTSUPP, errno.ENETUNREACH)
ACCEPT_BATCH = 64           # accepts per wake-up, so the selector and the timeouts still get turns
FD_SHARE = 4                # at most 1/FD_SHARE of RLIMIT_NOFILE goes to connections: migrations need fds too
OUT_OF_FDS_BACKOFF = 0.05


def fd_bound(configured: int) -> int:
    """The bound on connections held, lowered to fit the process's fd limit."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return configured if soft == resource.RLIM_INFINITY else max(1, min(configured, soft // FD_SHARE))


class Burst:
    """One log line when a run of the same event starts, one with the count when it ends."""

    def __init__(self, log: Logger, text: str) -> None:
        self.log = log
        self.text = text
        self.count = 0

    def hit(self, detail: str = "") -> None:
        if not self.count:
            self.log.warning(self.text + (f" ({detail})" if detail else ""))
        self.count += 1

    def end(self) -> None:
        if self.count > 1:
            self.log.warning(f"{self.text}: {self.count} in all")
        self.count = 0


class Listener:
    def __init__(self, sock: socket.socket, log: Logger, request_timeout: float, max_connections: int,
                 handled: Callable[[], int], on_request: Callable[[socket.socket, str, float], None]) -> None:
        """`handled()` counts the connections handed to `on_request(conn, peer, deadline)`, which
        owns them from then on."""
        self.sock = sock
        self.log = log
        self.request_timeout = request_timeout
        self.wanted = max_connections
        self.bound = fd_bound(max_connections)
        self.handled = handled
        self.on_request = on_request
        self.silent: OrderedDict[socket.socket, tuple[str, float]] = OrderedDict()   # oldest first
        self.selector = selectors.DefaultSelector()
        sock.setblocking(False)
        self.selector.register(sock, selectors.EVENT_READ)
        self.spare: int | None = os.open(os.devnull, os.O_RDONLY)
        self.full = Burst(log, f"at the bound of {self.bound} connections "
                               "(migration-max-connections): closing new ones at once")
        self.out_of_fds = Burst(log, "out of file descriptors in accept(): closing new connections at once")
        self.evicted = Burst(log, "closing the oldest silent connections to make room")
        self.expired = Burst(log, f"closing connections that sent no request within {request_timeout:g} s")

    def warn_if_lowered(self) -> None:
        if self.bound < self.wanted:
            self.log.warning(f"holding at most {self.bound} connections, not {self.wanted}: "
                             f"1/{FD_SHARE} of the fd limit (ulimit -n)")

    def held(self) -> int:
        return len(self.silent) + self.handled()

    def turn(self, timeout: float) -> None:
        """Wait up to `timeout` for connections and first bytes; accept, hand over, expire."""
        now = time.monotonic()
        if self.silent:
            oldest = next(iter(self.silent.values()))[1]
            timeout = max(0.0, min(timeout, oldest - now))
        for key, _ in self.selector.select(timeout):
            if key.fileobj is self.sock:
                self._accept()
            else:
                self._first_byte(key.fileobj)  # type: ignore[arg-type]
        self._expire()

    def close(self) -> None:
        for conn in list(self.silent):
            self._drop(conn)
        self.selector.close()
        self.sock.close()
        if self.spare is not None:
            os.close(self.spare)
            self.spare = None

    def _accept(self) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                conn, peer = self.sock.accept()
            except BlockingIOError:
                return
            except OSError as e:
                if e.errno in CONNECTION_GONE:
                    continue
                if e.errno not in OUT_OF_FDS:
                    raise
                if self._evict_oldest("out of file descriptors"):   # its fd is free now: try again
                    continue
                self.out_of_fds.hit(e.strerror or str(e))
                self._shed_one()
                time.sleep(OUT_OF_FDS_BACKOFF)
                return
            self.out_of_fds.end()
            if self.held() >= self.bound and not self._evict_oldest(f"at the bound of {self.bound} connections"):
                self.full.hit()
                conn.close()
                continue
            self.full.end()
            conn.setblocking(True)
            self.silent[conn] = (format_address(*peer[:2]), time.monotonic() + self.request_timeout)
            self.selector.register(conn, selectors.EVENT_READ)

    def _shed_one(self) -> None:
        """With no fd left: free the spare one, accept and close a connection with it, take it back."""
        if self.spare is None:
            return
        os.close(self.spare)
        self.spare = None
        try:
            conn, _ = self.sock.accept()
            conn.close()
        except OSError:
            pass
        try:
            self.spare = os.open(os.devnull, os.O_RDONLY)
        except OSError:
            pass              # taken again at the next shed

    def _evict_oldest(self, why: str) -> bool:
        if not self.silent:
            return False
        conn = next(iter(self.silent))
        self.evicted.hit(f"{why}; the first from {self.silent[conn][0]}")
        self._drop(conn)
        return True

    def _first_byte(self, conn: socket.socket) -> None:
        """Bytes arrived: a handler thread takes the connection. A peer that closed takes nothing."""
        peer, deadline = self.silent[conn]
        self.selector.unregister(conn)
        del self.silent[conn]
        try:
            closed = conn.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except BlockingIOError:
            closed = False
        except OSError:
            closed = True
        if closed:
            conn.close()
            return
        self.on_request(conn, peer, deadline)

    def _expire(self) -> None:
        now = time.monotonic()
        while self.silent:
            conn, (peer, deadline) = next(iter(self.silent.items()))
            if deadline > now:
                break
            self.expired.hit(f"from {peer}")
            self._drop(conn)
        if not self.silent:
            self.expired.end()
            self.evicted.end()

    def _drop(self, conn: socket.socket) -> None:
        self.selector.unregister(conn)
        del self.silent[conn]
        conn.close()
