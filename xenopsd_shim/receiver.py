"""`serve`: the receiving xenopsd, one thread per incoming migration.

A migration is confirmed only after the domain is fully restored (and,
when asked, verified page by page); the VM is started here only when the
source commits, so the source can fall back at every earlier step.
"""
from __future__ import annotations

import fcntl
import hmac
import ipaddress
import json
import os
import select
import signal
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from xenemu import DomainError, Host
from xenemu.memory import memory_digest

from . import tlstunnel, transport
from .accounting import CpuAccounting
from .imagereader import ImageReader, valid_uuid
from .listener import Listener
from .log import Logger
from .policy import DEFAULT_MAX_CONNECTIONS, SECRET_NAME, SERVE_ADDRESS
from .timeouts import Timeouts
from .zstdpipe import Zstd, ZstdError

STREAM_STOP_TIMEOUT = 90.0   # on shutdown, for the migrations cut mid-stream to clean up, all together
VGPU_POLL_MS = 200           # how often a parked vGPU connection looks for its peer's hangup and shutdown
VGPU_SHARE = 2               # unmatched vGPU connections may hold at most 1/VGPU_SHARE of the connections


class ReceiverError(Exception):
    """`serve` cannot start; the text is the one line the user sees."""


def claim_host(host: Host) -> int:
    """Lock the host directory itself (flock on its fd, kept open) for this `serve`'s lifetime:
    a second one would destroy the first's half-restored domains and remove its address file.
    The directory, not a file in it: nothing is left behind and nothing can unlink the lock."""
    fd = os.open(host.root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ReceiverError(f"another serve already runs on host directory {host.root}") from None
    return fd


class Receiver:
    def __init__(self, host: Host, listen: str, log: Logger, secret: str | None = None,
                 timeouts: Timeouts = Timeouts(), tls: ssl.SSLContext | None = None,
                 max_connections: int = DEFAULT_MAX_CONNECTIONS) -> None:
        self.host = host
        self.timeouts = timeouts
        self.tls = tls
        self.log = log
        self.secret = secret
        addr, port = transport.parse_address(listen, listening=True)
        self.lock_fd = claim_host(host)
        try:
            sock = socket.create_server((addr, port), family=socket.AF_INET6 if ":" in addr else socket.AF_INET)
        except OSError as e:
            os.close(self.lock_fd)
            raise ReceiverError(f"cannot listen on {listen}: {e.strerror or e}") from None
        self.address = transport.format_address(*sock.getsockname()[:2])
        self.stopping = threading.Event()
        self.active: dict[threading.Thread, IncomingMigration] = {}
        self._lock = threading.Lock()
        self.listener = Listener(sock, log, timeouts.request, max_connections, handled=lambda: len(self.active),
                                 on_request=self._start)
        self.vgpu_streams = VgpuStreams(timeouts, self.stopping, max(1, self.listener.bound // VGPU_SHARE))

    def _discard_half_restored(self) -> None:
        """Domains still `building` were being restored by a receiver that died: nothing of
        them ever ran and their source kept the VM, so they go (as xenopsd cleans up on start),
        with any whose creation was cut short."""
        for directory in self.host.discard_unfinished():
            self.log.warning(f"removed {directory}, a domain whose creation never finished")
        for domain in self.host.domains():
            if domain.state == "building":
                self.log.warning(f"destroying domain {domain.domid} (VM {domain.name}), "
                                 "left half-restored by an earlier receiver")
                domain.destroy()

    def _warn_if_open(self) -> None:
        """Without a secret anyone who reaches the port can migrate a VM in: fine on loopback only."""
        host = self.address.rpartition(":")[0].strip("[]")
        if self.secret is None and not ipaddress.ip_address(host.split("%")[0]).is_loopback:
            self.log.warning(f"listening on {self.address} without a migration secret: anyone who can reach "
                             f"it can migrate a VM here (give {self.host.root / SECRET_NAME} or --secret-file)")

    def serve_forever(self, ready: Callable[[], None]) -> None:
        """`ready` runs once start-up is over (half-restored domains gone, address published), so
        whoever waits for it sees the receiver as it stays: no start-up file still open."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stopping.set())
        self._discard_half_restored()
        marker = self.host.run_dir / SERVE_ADDRESS        # lets a migration see it targets its own host
        marker.write_text(f"{self.address}\n")
        ready()
        self._warn_if_open()
        self.listener.warn_if_lowered()
        try:
            while not self.stopping.is_set():
                self.listener.turn(0.2)
        finally:
            self.listener.close()
            marker.unlink(missing_ok=True)
            self._stop_active()

    def _start(self, conn: socket.socket, peer: str, deadline: float) -> None:
        """A connection with bytes to read: its own thread from here on."""
        incoming = IncomingMigration(self.host, conn, self.log.child(f"receiver[{peer}]"),
                                     self.vgpu_streams, self.secret, self.timeouts, deadline)
        thread = threading.Thread(target=self._handle, args=(incoming, peer), daemon=True)
        with self._lock:
            self.active[thread] = incoming
        thread.start()

    def _stop_active(self) -> None:
        """On shutdown, cut migrations still streaming (their sources fall back); let those
        whose domain is restored finish their handshake, since their source may have
        committed already and cutting them then would leave the VM running nowhere."""
        with self._lock:
            items = list(self.active.items())
        for _, incoming in items:
            if not incoming.restored:
                for conn in (incoming.conn, incoming.vgpu_conn):
                    if conn is not None:
                        try:
                            conn.shutdown(socket.SHUT_RDWR)
                        except OSError:
                            pass
        start = time.monotonic()
        for thread, incoming in items:
            limit = self.timeouts.handshake * 2 if incoming.restored else STREAM_STOP_TIMEOUT
            thread.join(timeout=max(0.0, start + limit - time.monotonic()))

    def _handle(self, incoming: "IncomingMigration", peer: str) -> None:
        try:
            self.timeouts.arm(incoming.conn)
            if self.tls is not None:
                try:
                    incoming.conn = tlstunnel.server(incoming.conn, self.tls, incoming.time_left(),
                                                     self.timeouts.stall)
                except tlstunnel.TlsError as e:
                    self.log.warning(f"refused a connection from {peer}: {e}")
                    return
                self.timeouts.arm(incoming.conn)
            incoming.run()
        except transport.TransportError as e:
            incoming.log.warning(str(e))
        except OSError as e:
            incoming.log.warning(f"connection lost: {e.strerror or e}")
        finally:
            if not incoming.handed_over:
                incoming.conn.close()
            with self._lock:
                self.active.pop(threading.current_thread(), None)


class VgpuRefused(Exception):
    def __init__(self, code: int, reason: str, text: str) -> None:
        super().__init__(text)
        self.code = code
        self.reason = reason


@dataclass
class ParkedVgpu:
    conn: socket.socket
    cookies: dict[str, str]
    ready: bool = False                              # its 200 is sent: a migration may take it
    taken: threading.Event = field(default_factory=threading.Event)


class VgpuStreams:
    """vGPU connections, parked until the memory migration of the same VM takes them.

    One per VM, at most `limit` at once, each for at most the vGPU timeout and only while
    its peer stays connected: an unmatched one holds a thread and an fd, so it must not
    hold them for long or in numbers. Once taken, the memory migration owns the connection."""

    def __init__(self, timeouts: Timeouts, stopping: threading.Event, limit: int) -> None:
        self.timeouts = timeouts
        self.stopping = stopping
        self.limit = limit
        self._cond = threading.Condition()
        self._waiting: dict[str, ParkedVgpu] = {}

    def park(self, uuid: str, conn: socket.socket, cookies: dict[str, str], log: Logger) -> bool:
        """Called on the vGPU connection's thread, which answers the request here; True when
        a migration took the connection (it is theirs now), False when it was dropped."""
        parked = ParkedVgpu(conn, cookies)
        with self._cond:
            if uuid in self._waiting:
                raise VgpuRefused(409, "Conflict", f"a vGPU stream for VM {uuid} is already waiting")
            if len(self._waiting) >= self.limit:
                raise VgpuRefused(503, "Service Unavailable",
                                  f"{self.limit} vGPU streams already wait for their migrations")
            self._waiting[uuid] = parked
        try:
            transport.send_status(conn, 200, "OK")
        except transport.TransportError:
            self._forget(uuid, parked)
            raise
        with self._cond:
            parked.ready = True
            self._cond.notify_all()
        log.info(f"vGPU stream of VM {uuid} waiting for its migration")
        deadline = time.monotonic() + self.timeouts.vgpu
        hangup = select.poll()
        hangup.register(conn, select.POLLRDHUP)
        while not parked.taken.is_set():
            hung_up = bool(hangup.poll(VGPU_POLL_MS))
            if self.stopping.is_set():           # (shutting down closes it too)
                why = "shutting down"
            elif hung_up:
                why = "its peer closed the connection"
            elif time.monotonic() > deadline:
                why = f"no migration of VM {uuid} took it within {self.timeouts.vgpu:g} s"
            else:
                continue
            if self._forget(uuid, parked):
                log.warning(f"dropped the vGPU stream of VM {uuid}: {why}")
                return False
        return True

    def _forget(self, uuid: str, parked: ParkedVgpu) -> bool:
        """Unpark unless a migration took it meanwhile."""
        with self._cond:
            if parked.taken.is_set():
                return False
            del self._waiting[uuid]
            return True

    def take(self, uuid: str) -> tuple[socket.socket, dict[str, str]]:
        with self._cond:
            if not self._cond.wait_for(lambda: uuid in self._waiting and self._waiting[uuid].ready,
                                       self.timeouts.vgpu):
                raise transport.TransportError(f"no vGPU stream arrived for VM {uuid} "
                                               f"within {self.timeouts.vgpu:g} s")
            parked = self._waiting.pop(uuid)
            parked.taken.set()
            return parked.conn, parked.cookies


class IncomingMigration:
    def __init__(self, host: Host, conn: socket.socket, log: Logger, vgpu_streams: VgpuStreams,
                 secret: str | None, timeouts: Timeouts, deadline: float) -> None:
        self.secret = secret
        self.deadline = deadline   # for the request's head (monotonic)
        self.timeouts = timeouts
        self.host = host
        self.conn = conn
        self.log = log
        self.vgpu_streams = vgpu_streams
        self.vgpu_conn: socket.socket | None = None     # the vGPU stream's connection, once taken
        self.vgpu_zstd: Zstd | None = None
        self.restored = False      # past the stream: a shutdown lets the handshake finish
        self.handed_over = False   # a parked vGPU connection now owned by its memory migration

    def time_left(self) -> float:
        return max(0.001, self.deadline - time.monotonic())

    def run(self) -> None:
        try:
            request = transport.read_request(self.conn, self.time_left())
        except transport.TransportError as e:
            self.log.warning(f"bad request: {e}")
            return
        if self.secret is not None and not hmac.compare_digest(
                request.cookies.get(transport.SECRET_COOKIE, "").encode(), self.secret.encode()):
            transport.send_status(self.conn, 403, "Forbidden")
            how = "a wrong" if transport.SECRET_COOKIE in request.cookies else "no"
            self.log.warning(f"refused {request.method} {request.path[:80]}: {how} migration secret")
            return
        if request.method == "PUT" and request.path.startswith((transport.VGPU_PATH, transport.MEMORY_PATH)) \
                and not valid_uuid(request.vm_uuid):
            transport.send_status(self.conn, 400, "Bad Request")
            self.log.warning(f"refused {request.method} {request.path[:80]}: not a VM uuid")
            return
        if request.method == "PUT" and request.path.startswith(transport.VGPU_PATH):
            try:
                self.handed_over = self.vgpu_streams.park(request.vm_uuid, self.conn, request.cookies, self.log)
            except VgpuRefused as e:
                transport.send_status(self.conn, e.code, e.reason)
                self.log.warning(f"refused {request.method} {request.path[:80]}: {e}")
            return
        if request.method == "GET" and request.path.startswith(transport.STATE_PATH) and valid_uuid(request.vm_uuid):
            transport.send_status(self.conn, 200, "OK")
            transport.send_line(self.conn, self._state_of(request.vm_uuid))
            return
        if request.method != "PUT" or not request.path.startswith(transport.MEMORY_PATH):
            transport.send_status(self.conn, 404, "Not Found")
            self.log.warning(f"refused {request.method} {request.path[:80]}")
            return
        transport.send_status(self.conn, 200, "OK")
        try:
            self._receive(request)
        finally:
            if self.vgpu_zstd is not None:
                self.vgpu_zstd.stop()
            if self.vgpu_conn is not None:
                self.vgpu_conn.close()

    def _state_of(self, vm_uuid: str) -> str:
        """For a source whose commit went unconfirmed: did the VM start here?"""
        try:
            state = self.host.find(vm_uuid).state
        except DomainError:
            state = transport.STATE_ABSENT
        self.log.info(f"asked for the state of VM {vm_uuid}: {state}")
        return state

    def _vgpu_fd(self, request: transport.Request) -> int:
        """The vGPU stream's fd: its own connection, through its own zstd in stream mode."""
        self.vgpu_conn, cookies = self.vgpu_streams.take(request.vm_uuid)
        conn = self.vgpu_conn
        if cookies.get("compress") == "zstd":
            self.vgpu_zstd = Zstd(compress=False, far_fd=conn.fileno(), relay_from=conn)
            assert self.vgpu_zstd.fd is not None
            return self.vgpu_zstd.fd
        return conn.fileno()

    def _receive(self, request: transport.Request) -> None:
        stream = request.cookies.get("compress")
        self.log.info(f"incoming migration of VM {request.vm_uuid}" + (f" (compress={stream})" if stream else ""))
        cpu_start = time.thread_time()
        if stream not in (None, "zstd"):
            self._fail(f"unknown stream compression {stream!r}")
            return
        try:
            zstd = Zstd(compress=False, far_fd=self.conn.fileno(), relay_from=self.conn) if stream == "zstd" else None
        except ZstdError as e:
            self._fail(str(e))
            return
        reader = ImageReader(self.host, zstd.fd if zstd else self.conn.fileno(), log=self.log,
                             vgpu_fd=lambda: self._vgpu_fd(request), uuid=request.vm_uuid)
        roots = lambda: [*reader.emu_pids, *(z.pid for z in (zstd, self.vgpu_zstd) if z)]  # noqa: E731
        with CpuAccounting(roots=roots) as cpu:
            domain = None
            try:
                domain = reader.run()
                for z in (zstd, self.vgpu_zstd):
                    if z is not None:
                        z.finish()     # each frame ended with its stream: zstd must exit 0 now
            except Exception as e:
                failure = next(filter(None, (z.failure() for z in (zstd, self.vgpu_zstd) if z)), None)
                if domain is not None:
                    domain.destroy()
                self._fail(f"restore failed: {failure or e}")
                return
            finally:
                if zstd is not None:
                    zstd.stop()
        self.restored = True
        try:
            stats = {"cpu_seconds": {**{k: v for k, v in cpu.by_role().items() if k != "xenopsd-shim"},
                                     "xenopsd-shim": round(time.thread_time() - cpu_start, 3)}}
            transport.send_line(self.conn, transport.HS_STATS + json.dumps(stats))
            transport.send_line(self.conn, transport.HS_SUCCESS)
            if request.cookies.get("verify") == "true":
                self._verify(domain)
                transport.send_line(self.conn, transport.HS_SUCCESS)
            commit = transport.recv_line(self.conn, self.timeouts.handshake, "the source's commit")
            if commit != transport.HS_SUCCESS:
                raise transport.TransportError(f"source did not commit: {commit[:80]!r}")
            domain.unpause()
        except Exception as e:
            domain.destroy()
            self._fail(str(e))
            return
        try:
            transport.send_line(self.conn, transport.HS_SUCCESS)
        except transport.TransportError:
            pass   # the VM runs here now; the source learns by its own timeout
        self.log.info(f"VM {domain.name} (domid {domain.domid}) restored and running")
        domain.close()         # the VM belongs to the host now, not to this long-lived process

    def _verify(self, domain: Any) -> None:
        line = transport.recv_line(self.conn, self.timeouts.handshake, "the source's digest")
        if not line.startswith(transport.HS_VERIFY):
            raise transport.TransportError(f"expected the source's digest, got {line[:80]!r}")
        ours = memory_digest(domain.memory)
        if line[len(transport.HS_VERIFY):] != ours:
            raise transport.TransportError("verification failed: restored memory differs from the source's "
                                           "memory at the pause point")
        self.log.info(f"VM {domain.name}: every page verified")

    def _fail(self, text: str) -> None:
        self.log.warning(text)
        try:
            transport.send_line(self.conn, f"{transport.HS_ERROR} {text}")
        except transport.TransportError:
            pass
