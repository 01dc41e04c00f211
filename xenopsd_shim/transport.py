"""The migration transport: HTTP/1.1 requests that turn into raw streams, and xenopsd's handshake.

As xenopsd does it (xenops_server.ml VM_migrate / VM_receive_memory, xenopsd.ml
handle_received_fd): the source opens up to three connections, each a `PUT`
with cookies and no HTTP response, only binary handshake messages
(Xenops_migrate.Handshake: u16 big-endian length, 0 = Success, else that many
bytes of error text) and the streams. Reads never take a byte beyond what they
parse (MSG_PEEK first, or exact lengths), because the rest of the socket
belongs to the emulators reading their streams from the same fd.
"""
from __future__ import annotations

import json
import select
import socket
import ssl
import struct
import time
from dataclasses import dataclass
from urllib.parse import quote, unquote

from . import tlstunnel
from .timeouts import Timeouts

SERVICES = "/services/xenops/"
MIGRATE_VM_PATH = SERVICES + "migrate/vm/"       # signalling; the receiver creates the domain
MIGRATE_MEM_PATH = SERVICES + "migrate/mem/"     # the suspend image
MIGRATE_VGPU_PATH = SERVICES + "migrate/vgpu/"   # the vGPU stream: <vm id>.<device id>
LEGACY_MEMORY_PATH = SERVICES + "memory/"        # older senders: as migrate/vm, cookies decide
LEGACY_VGPU_PATH = SERVICES + "migrate-vgpu/"    # older senders' vGPU route: as migrate/vgpu
# Ours, not xenopsd's: where a source whose commit went unconfirmed asks what became of
# the VM (xapi would ask the destination pool through its API instead). Plain HTTP.
STATE_PATH = SERVICES + "vm-state/"
STATE_ABSENT = "absent"      # the answer when the destination has no such VM
# Ours too: what the destination accepts (features.py), a JSON object; an older receiver has no
# such route (404). Asked by a source before it opens a migration whose method depends on it.
FEATURES_PATH = SERVICES + "features"
MAX_HEAD = 16 << 10
MAX_ANSWER = 16 << 10        # the body of an answer on our GET routes, at most
SO_MAX_PACING_RATE = getattr(socket, "SO_MAX_PACING_RATE", 47)

# xenopsd's cookies (xenops_server.ml VM_migrate do_request, VM.receive_memory).
COOKIE_INSTANCE_ID = "instance_id"     # the sending xenopsd's instance
COOKIE_FINAL_ID = "final_id"           # the VM's uuid once migrated (the path names a temporary one)
COOKIE_DBG = "dbg"                     # the task's debug string; the receiver requires it
COOKIE_MEM_MIGRATION = "mem_migration"  # the sender's version: memory comes on its own connection
COOKIE_COMPRESS = "compress"           # present: the streams are zstd (the stream method)
COMPRESS_ZSTD = "zstd"
COOKIE_MEMORY_LIMIT = "memory_limit"   # vm connection: bytes to allocate; the receiver requires it
COOKIE_MEMORY_TOTAL_SOURCE = "memory_total_source"   # vm connection (see docs/xenopsd-protocol.md)
COOKIE_VGPU_MIGRATION = "vgpu_migration"  # vGPU connection: without it the receiver refuses
MEM_MIGRATION_VERSION = "xenmig-1"
# This project's extensions: extra cookies a real receiver ignores (docs/xenopsd-protocol.md).
SECRET_COOKIE = "secret"               # the destination's migration secret, when it requires one
METADATA_COOKIE = "vm_metadata"        # our substitute for the VM.import_metadata call
EXTENSIONS_COOKIE = "xenmig_extensions"  # what the sender asks for, comma-separated
EXT_VERIFY = "verify"      # digest of every page at the pause point, checked before the commit
EXT_STATS = "stats"        # the receiver's accounting after point 4
EXT_STATE = "state"        # the receiver answers STATE_PATH queries
EXTENSIONS = (EXT_VERIFY, EXT_STATS, EXT_STATE)
EXT_ANNOUNCE = "xenmig-extensions:"    # the receiver's answer, a message before point 1, only if asked

HANDSHAKE = struct.Struct("!H")
MAX_MESSAGE = 0xFFFF


class TransportError(Exception):
    pass


class AnswerError(TransportError):
    """Connected, but no usable answer came to a GET: closed, slow, too long or malformed."""


@dataclass
class Answer:
    """An HTTP answer on one of our GET routes: its status code and line; the body of a 200."""
    status: int
    line: str
    body: bytes


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
    return recv_exact(sock, n, None, "the rest of a line")


# Client side -------------------------------------------------------------------
def connect(dest: str, timeouts: Timeouts, max_bandwidth: int | None = None,
            tls: ssl.SSLContext | None = None) -> socket.socket:
    """A connection to the destination; `max_bandwidth` (bytes/s) paces the socket in the kernel,
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
    return sock


def build_request(method: str, path: str, host: str, cookies: dict[str, str]) -> bytes:
    """The request head as xenopsd's do_request writes it: cookies, keep-alive, no body."""
    cookie = "; ".join(f"{k}={quote(v, safe='')}" for k, v in cookies.items())
    return (f"{method} {path} HTTP/1.1\r\nHost: {host}\r\n" + (f"Cookie: {cookie}\r\n" if cookie else "")
            + "Connection: keep-alive\r\nUser-agent: xenopsd\r\n\r\n").encode()


def open_stream(dest: str, path: str, cookies: dict[str, str], timeouts: Timeouts,
                max_bandwidth: int | None = None, tls: ssl.SSLContext | None = None) -> socket.socket:
    """Connect and PUT; no response comes back but handshake messages (recv_result)."""
    sock = connect(dest, timeouts, max_bandwidth, tls)
    try:
        send(sock, build_request("PUT", path, format_address(*parse_address(dest)), cookies))
    except TransportError as e:
        sock.close()
        raise TransportError(f"{dest}: {e}") from None
    return sock


def http_get(dest: str, path: str, cookies: dict[str, str], timeouts: Timeouts,
             tls: ssl.SSLContext | None = None, limit: int = MAX_ANSWER, line: bool = False) -> Answer:
    """A GET on one of our extension routes. Connecting fails as a migration's connection would
    (TransportError); once connected, the whole answer must come within the connect timeout and
    its body (read for a 200 only: one `line`, else to its Content-Length or else to the end)
    within `limit` bytes, else AnswerError."""
    sock = connect(dest, timeouts, tls=tls)
    deadline = time.monotonic() + timeouts.connect
    try:
        send(sock, build_request("GET", path, format_address(*parse_address(dest)), cookies))
        head = _read_until(sock, b"\r\n\r\n", MAX_HEAD, timeouts.connect, "the destination's answer")
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
            raise AnswerError(f"malformed status line {lines[0][:80]!r}")
        if parts[1] != "200":
            return Answer(int(parts[1]), lines[0], b"")
        length = next((value.strip() for key, _, value in (h.partition(":") for h in lines[1:])
                       if key.strip().lower() == "content-length"), None)
        if line:
            body = _read_until(sock, b"\n", limit, max(0.001, deadline - time.monotonic()), "the answer's line")
        elif length is None:
            body = _recv_to_end(sock, limit, deadline)
        elif not length.isdigit() or int(length) > limit:
            raise AnswerError(f"an answer of {length[:20]} bytes (at most {limit} are read)")
        else:
            body = recv_exact(sock, int(length), max(0.0, deadline - time.monotonic()), "the answer's body")
        return Answer(200, lines[0], body)
    except TransportError as e:
        raise AnswerError(str(e)) from None
    finally:
        sock.close()


def _recv_to_end(sock: socket.socket, limit: int, deadline: float) -> bytes:
    """Everything up to the peer's close, at most `limit` bytes, by `deadline`."""
    data = b""
    while True:
        chunk = recv_some(sock, limit + 1 - len(data), max(0.0, deadline - time.monotonic()), "the answer's body")
        if not chunk:
            return data
        data += chunk
        if len(data) > limit:
            raise AnswerError(f"an answer longer than {limit} bytes")


def query_state(dest: str, vm_uuid: str, cookies: dict[str, str], timeouts: Timeouts,
                tls: ssl.SSLContext | None = None) -> str:
    """The destination's word on a VM: its domain state, or STATE_ABSENT (our extension: a
    plain HTTP GET with a status line and one line of answer)."""
    answer = http_get(dest, STATE_PATH + vm_uuid, cookies, timeouts, tls, line=True)
    if answer.status != 200:
        raise TransportError(f"{dest} refused the request: {answer.line}")
    return answer.body[:-1].decode(errors="replace")


def query_features(dest: str, cookies: dict[str, str], timeouts: Timeouts,
                   tls: ssl.SSLContext | None = None) -> bytes | None:
    """The destination's features document (features.py), None where the route is unknown (404:
    an older receiver). A refused secret (403) fails as point 1 would; another status is an
    AnswerError."""
    answer = http_get(dest, FEATURES_PATH, cookies, timeouts, tls)
    if answer.status == 403:
        how = "a wrong" if SECRET_COOKIE in cookies else "no"
        raise TransportError(f"destination failed: {how} migration secret")
    if answer.status == 404:
        return None
    if answer.status != 200:
        raise AnswerError(f"status {answer.line[:80]!r}")
    return answer.body


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


def send_status(sock: socket.socket, code: int, reason: str, json_body: bytes | None = None) -> None:
    """An HTTP response: only where xenopsd writes one (an unknown route) and on our GET routes;
    `json_body` goes with its type and length."""
    headers = "" if json_body is None else \
        f"Content-Type: application/json\r\nContent-Length: {len(json_body)}\r\n"
    send(sock, f"HTTP/1.1 {code} {reason}\r\n{headers}Connection: close\r\n\r\n".encode() + (json_body or b""))


def send_line(sock: socket.socket, line: str) -> None:
    send(sock, line.encode() + b"\n")


def recv_line(sock: socket.socket, timeout: float | None, what: str) -> str:
    return _read_until(sock, b"\n", MAX_HEAD, timeout, what)[:-1].decode(errors="replace")


def send(sock: socket.socket, data: bytes) -> None:
    """A peer gone is a TransportError, as on the reading side."""
    try:
        sock.sendall(data)
    except OSError as e:
        raise TransportError(f"connection lost: {e.strerror or e}") from None


# Handshake messages (Xenops_migrate.Handshake) -----------------------------------------
def build_result(error: str | None) -> bytes:
    """Success (None) or an error text, truncated to what the length field holds."""
    text = b"" if error is None else (error.encode(errors="replace")[:MAX_MESSAGE] or b"?")
    return HANDSHAKE.pack(len(text)) + text


def send_result(sock: socket.socket, error: str | None = None) -> None:
    send(sock, build_result(error))


def xenopsd_error(text: str) -> str:
    """An error as xenopsd's receiver sends it: its Xenopsd_error marshalled to JSON."""
    return json.dumps(["Internal_error", text])


def describe_error(text: str) -> str:
    """The words of a received error: a marshalled Xenopsd_error's arguments, else the text."""
    try:
        value = json.loads(text)
    except ValueError:
        return text
    if isinstance(value, list) and value and all(isinstance(x, str) for x in value):
        return ": ".join(value[1:]) or value[0]
    return text


def recv_result(sock: socket.socket, timeout: float | None, what: str) -> str | None:
    """The next handshake message: None for Success, else its text. Exactly its bytes are read."""
    (length,) = HANDSHAKE.unpack(recv_exact(sock, HANDSHAKE.size, timeout, what))
    return None if length == 0 else recv_exact(sock, length, timeout, what).decode(errors="replace")


def recv_exact(sock: socket.socket, n: int, timeout: float | None, what: str) -> bytes:
    """n bytes within `timeout`, waiting in poll() so the fd's blocking mode (shared with the
    emulators) is never changed."""
    deadline = None if timeout is None else time.monotonic() + timeout
    data = b""
    while len(data) < n:
        chunk = recv_some(sock, n - len(data), None if deadline is None else deadline - time.monotonic(), what)
        if not chunk:
            raise TransportError(f"connection closed while waiting for {what}")
        data += chunk
    return data


def recv_some(sock: socket.socket, n: int, timeout: float | None, what: str) -> bytes:
    """Up to n bytes once some arrive within `timeout` (b"": the peer closed), waiting in poll()."""
    poller = select.poll()
    poller.register(sock, select.POLLIN | select.POLLRDHUP)
    if not poller.poll(None if timeout is None else max(0, int(timeout * 1000))):
        raise TransportError(f"timed out waiting for {what}")
    try:
        return sock.recv(n)
    except OSError as e:
        raise TransportError(f"connection error while reading {what}: {e.strerror or e}") from None


def tcp_bytes(sock: socket.socket) -> tuple[int, int]:
    """(bytes acked, bytes received): the real wire payload (under TLS, of the TCP connection
    beneath the tunnel, also once the tunnel has closed it)."""
    if isinstance(sock, tlstunnel.TunnelSocket):
        return sock.wire.counts()
    return tlstunnel.tcp_counts(sock)
