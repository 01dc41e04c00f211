"""The migration transport: an HTTP/1.1 request on a TCP connection, then the raw stream.

As xenopsd does it: `PUT /services/xenops/memory/<vm-uuid>` with options in
cookies, a status line back, then the suspend image on the same socket; after
the image, text handshake lines. Reads never take a byte beyond what they
parse (MSG_PEEK first), because the rest of the socket belongs to the
emulators reading their streams from the same fd.
"""
from __future__ import annotations

import socket
import ssl
import struct
import time
from dataclasses import dataclass
from urllib.parse import quote, unquote

from . import tlstunnel
from .timeouts import Timeouts

MEMORY_PATH = "/services/xenops/memory/"
VGPU_PATH = "/services/xenops/migrate-vgpu/"     # the vGPU stream's own connection
# Ours, not xenopsd's: where a source whose commit went unconfirmed asks what became of
# the VM (xapi would ask the destination pool through its API instead).
STATE_PATH = "/services/xenops/vm-state/"
STATE_ABSENT = "absent"      # the answer when the destination has no such VM
MAX_HEAD = 16 << 10
SO_MAX_PACING_RATE = getattr(socket, "SO_MAX_PACING_RATE", 47)

# Handshake lines after the image (xenopsd's Handshake: Success / Error:<msg>).
SECRET_COOKIE = "secret"     # the destination's migration secret, when it requires one
HS_SUCCESS = "Success"
HS_ERROR = "Error:"
HS_VERIFY = "Verify:"        # + digest of every page at the pause point (sender -> receiver)
HS_STATS = "Stats:"          # + JSON of the receiver's accounting (receiver -> sender)


class TransportError(Exception):
    pass


@dataclass
class Request:
    method: str
    path: str
    cookies: dict[str, str]

    @property
    def vm_uuid(self) -> str:
        return self.path.rsplit("/", 1)[-1]


def parse_address(text: str, listening: bool = False) -> tuple[str, int]:
    """HOST:PORT; port 0 (any free port) only for a listener."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not (0 if listening else 1) <= int(port) < 65536:
        raise TransportError(f"invalid address {text!r} (expected HOST:PORT)")
    return host.strip("[]") or "127.0.0.1", int(port)


def format_address(host: str, port: int) -> str:
    """HOST:PORT as parse_address reads it back: an IPv6 address in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _read_until(sock: socket.socket, terminator: bytes, limit: int, timeout: float | None, what: str) -> bytes:
    """Consume bytes up to and including `terminator`, and not one more.

    What has arrived is peeked at; bytes without the terminator all belong to this line, so
    they are taken, and the next peek blocks until more arrive or the peer closes."""
    deadline = None if timeout is None else time.monotonic() + timeout
    got = b""
    while True:
        sock.settimeout(None if deadline is None else max(0.001, deadline - time.monotonic()))
        try:
            peek = sock.recv(limit - len(got), socket.MSG_PEEK)
        except (socket.timeout, TimeoutError):
            raise TransportError(f"timed out waiting for {what}") from None
        except OSError as e:
            raise TransportError(f"connection error while reading {what}: {e.strerror or e}") from None
        finally:
            sock.settimeout(None)
        if not peek:
            raise TransportError(f"connection closed while waiting for {what}")
        start = max(0, len(got) - len(terminator) + 1)         # a terminator may straddle the two
        end = (got + peek).find(terminator, start)
        if end >= 0:
            return got + _recv_exact(sock, end + len(terminator) - len(got))
        got += _recv_exact(sock, len(peek))
        if len(got) >= limit:
            raise TransportError(f"{what} longer than {limit} bytes")


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise TransportError("connection closed")
        data += chunk
    return data


# Client side -------------------------------------------------------------------
def open_stream(dest: str, path: str, cookies: dict[str, str], timeouts: Timeouts,
                max_bandwidth: int | None = None, tls: ssl.SSLContext | None = None,
                method: str = "PUT") -> socket.socket:
    """Connect and make the request; `max_bandwidth` (bytes/s) paces the socket in the kernel,
    so it holds whoever writes to the fd (xenguest, zstd) with no relay in between. With
    `tls`, the socket returned is the local end of a TLS tunnel (see tlstunnel)."""
    host, port = parse_address(dest)
    try:
        sock = socket.create_connection((host, port), timeout=timeouts.connect)
        if max_bandwidth:
            sock.setsockopt(socket.SOL_SOCKET, SO_MAX_PACING_RATE, max_bandwidth)
    except OSError as e:
        raise TransportError(f"cannot connect to {dest}: {e.strerror or e}") from None
    sock.settimeout(None)
    timeouts.arm(sock)
    if tls is not None:
        try:
            sock = tlstunnel.client(sock, tls, host, timeouts.connect, timeouts.stall)
        except tlstunnel.TlsError as e:
            raise TransportError(f"{dest}: {e}") from None
        timeouts.arm(sock)
    cookie = "; ".join(f"{k}={quote(v)}" for k, v in cookies.items())
    head = (f"{method} {path} HTTP/1.1\r\nHost: {format_address(host, port)}\r\n"
            + (f"Cookie: {cookie}\r\n" if cookie else "") + "Connection: close\r\n\r\n")
    try:
        sock.sendall(head.encode())
        status = _read_until(sock, b"\r\n\r\n", MAX_HEAD, timeouts.connect, "the receiver's response")
    except (OSError, TransportError) as e:
        sock.close()
        raise TransportError(f"{dest}: {e}") from None
    line = status.split(b"\r\n", 1)[0].decode(errors="replace")
    parts = line.split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or parts[1] != "200":
        sock.close()
        raise TransportError(f"{dest} refused the {'migration' if method == 'PUT' else 'request'}: {line}")
    return sock


def query_state(dest: str, vm_uuid: str, cookies: dict[str, str], timeouts: Timeouts,
                tls: ssl.SSLContext | None = None) -> str:
    """The destination's word on a VM: its domain state, or STATE_ABSENT."""
    sock = open_stream(dest, STATE_PATH + vm_uuid, cookies, timeouts, tls=tls, method="GET")
    try:
        return recv_line(sock, timeouts.connect, "the destination's VM state")
    finally:
        sock.close()


# Server side -------------------------------------------------------------------
def read_request(sock: socket.socket, timeout: float) -> Request:
    head = _read_until(sock, b"\r\n\r\n", MAX_HEAD, timeout, "the request").decode("latin-1")
    lines = head.split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise TransportError(f"malformed request line {lines[0][:80]!r}")
    cookies: dict[str, str] = {}
    for line in lines[1:]:
        key, _, value = line.partition(":")
        if key.strip().lower() == "cookie":
            for item in value.split(";"):
                k, eq, v = item.strip().partition("=")
                if eq:
                    cookies[k] = unquote(v)
    return Request(parts[0], parts[1], cookies)


def send_status(sock: socket.socket, code: int, reason: str) -> None:
    _send(sock, f"HTTP/1.1 {code} {reason}\r\nConnection: close\r\n\r\n".encode())


# Handshake lines -----------------------------------------------------------------
def send_line(sock: socket.socket, line: str) -> None:
    _send(sock, line.encode() + b"\n")


def _send(sock: socket.socket, data: bytes) -> None:
    """A peer gone is a TransportError, as on the reading side."""
    try:
        sock.sendall(data)
    except OSError as e:
        raise TransportError(f"connection lost: {e.strerror or e}") from None


def recv_line(sock: socket.socket, timeout: float | None, what: str) -> str:
    return _read_until(sock, b"\n", MAX_HEAD, timeout, what)[:-1].decode(errors="replace")


def tcp_bytes(sock: socket.socket) -> tuple[int, int]:
    """(bytes acked, bytes received) from the kernel's TCP_INFO: the real wire payload
    (under TLS, of the TCP connection beneath the tunnel)."""
    sock = getattr(sock, "wire", sock)
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
    except OSError:
        return 0, 0
    if len(info) < 136:
        return 0, 0
    return struct.unpack_from("<QQ", info, 120)
