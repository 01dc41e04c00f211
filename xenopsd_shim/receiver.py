"""`serve`: the receiving xenopsd, one thread per connection.

As xenops_server.ml's handlers: the vm connection (VM.receive_memory) creates
the domain and answers at synchronisation point 1, before any image byte; the
mem and vGPU connections (VM.receive_mem, VM.receive_vgpu) are answered at
once and wait, parked, until the vm connection's thread takes them. The VM is
started here only when the source commits (point 3), so the source can fall
back at every earlier step; the answer is point 4.
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
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator

from xenemu import Domain, DomainError, Host
from xenemu.memory import memory_digest
from xenmig import compressed, delta, image

from . import codecs, features, tlstunnel, transport
from .accounting import CpuAccounting
from .imagereader import ImageReader, parse_vm_metadata, valid_uuid
from .listener import Listener
from .log import Logger
from .policy import DEFAULT_MAX_CONNECTIONS, SECRET_NAME, SERVE_ADDRESS
from .timeouts import Timeouts

STREAM_STOP_TIMEOUT = 90.0   # on shutdown, for the migrations cut mid-stream to clean up, all together
PARK_POLL_MS = 200           # how often a parked connection looks for its peer's hangup and shutdown
PARK_SHARE = 2               # unmatched mem/vGPU connections may hold at most 1/PARK_SHARE of the connections
LINGER = 2.0                 # after an early error, how long the peer may take to read it and close

# Routes, as xenopsd.ml handle_received_fd dispatches them: (prefix, handler).
ROUTE_VM, ROUTE_MEM, ROUTE_VGPU = "vm", "mem", "vgpu"
ROUTES = ((transport.MIGRATE_VM_PATH, ROUTE_VM), (transport.LEGACY_MEMORY_PATH, ROUTE_VM),
          (transport.MIGRATE_MEM_PATH, ROUTE_MEM),
          (transport.MIGRATE_VGPU_PATH, ROUTE_VGPU), (transport.LEGACY_VGPU_PATH, ROUTE_VGPU))


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
                 max_connections: int = DEFAULT_MAX_CONNECTIONS, accept_in_band: bool = True,
                 accept_delta: bool = True) -> None:
        """`accept_in_band` (`accept_delta`) False: an older host, which neither publishes in-band
        compression (delta records) nor restores its records (its xenguests, through emu-manager,
        inherit the refusal)."""
        self.host = host
        self.features = features.to_json(features.published(accept_in_band, accept_delta))
        if not accept_in_band:
            os.environ[compressed.REFUSE_ENV] = "1"
        if not accept_delta:
            os.environ[delta.REFUSE_ENV] = "1"
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
        self.parked = ParkedStreams(timeouts, self.stopping, max(1, self.listener.bound // PARK_SHARE))

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
                                     self.parked, self.secret, self.timeouts, deadline, self.features)
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
                for conn in (incoming.conn, incoming.mem_conn, incoming.vgpu_conn):
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


class StreamRefused(Exception):
    """A mem or vGPU connection that cannot be parked; the text goes back as a handshake error."""


@dataclass
class Parked:
    conn: socket.socket
    cookies: dict[str, str]
    ready: bool = False                              # its Success is sent: a migration may take it
    taken: threading.Event = field(default_factory=threading.Event)


class ParkedStreams:
    """mem and vGPU connections, parked until the vm connection of the same VM takes them.

    One per VM and kind, at most `limit` unmatched at once, each for at most the vGPU timeout and
    only while its peer stays connected: an unmatched one holds a thread and an fd, so it must not
    hold them for long or in numbers. One that a migration in progress expects is matched, so a
    flood of unmatched ones cannot refuse it: a mem connection, expected from point 1 on; a vGPU
    one, from when its vm request has been read (its source opens it right after sending that
    request, so under a flood it may still lose that race: the migration then fails cleanly).
    Once taken, the vm connection's thread owns it."""

    def __init__(self, timeouts: Timeouts, stopping: threading.Event, limit: int) -> None:
        self.timeouts = timeouts
        self.stopping = stopping
        self.limit = limit
        self._cond = threading.Condition()
        self._waiting: dict[tuple[str, str], Parked] = {}
        self._expected: Counter[tuple[str, str]] = Counter()     # keys a migration will take

    def park(self, kind: str, vm_id: str, conn: socket.socket, cookies: dict[str, str], log: Logger) -> bool:
        """Called on the connection's own thread, which answers it here (Success: point 1-mem or
        1-vgpu); True when a migration took the connection (it is theirs now), False when dropped."""
        key = (kind, vm_id)
        parked = Parked(conn, cookies)
        with self._cond:
            if key in self._waiting:
                raise StreamRefused(f"a {kind} connection for VM {vm_id} is already waiting")
            if len(self._waiting) >= self.limit and key not in self._expected:
                raise StreamRefused(f"{self.limit} mem/vGPU connections already wait for their migrations")
            self._waiting[key] = parked
        try:
            transport.send_result(conn)
        except transport.TransportError:
            self._forget(key, parked)
            raise
        with self._cond:
            parked.ready = True
            self._cond.notify_all()
        log.info(f"{kind} connection of VM {vm_id} waiting for its migration")
        deadline = time.monotonic() + self.timeouts.vgpu
        hangup = select.poll()
        hangup.register(conn, select.POLLRDHUP)
        while not parked.taken.is_set():
            hung_up = bool(hangup.poll(PARK_POLL_MS))
            if self.stopping.is_set():           # (shutting down closes it too)
                why = "shutting down"
            elif hung_up:
                why = "its peer closed the connection"
            elif time.monotonic() > deadline:
                why = f"no migration of VM {vm_id} took it within {self.timeouts.vgpu:g} s"
            else:
                continue
            if self._forget(key, parked):
                log.warning(f"dropped the {kind} connection of VM {vm_id}: {why}")
                return False
        return True

    def _forget(self, key: tuple[str, str], parked: Parked) -> bool:
        """Unpark unless a migration took it meanwhile."""
        with self._cond:
            if parked.taken.is_set():
                return False
            del self._waiting[key]
            return True

    @contextmanager
    def expecting(self, kind: str, vm_id: str) -> Iterator[None]:
        """While a migration will take this connection: it parks even when the parking is full."""
        key = (kind, vm_id)
        with self._cond:
            self._expected[key] += 1
            self._cond.notify_all()
        try:
            yield
        finally:
            with self._cond:
                self._expected[key] -= 1
                if not self._expected[key]:
                    del self._expected[key]

    def take(self, kind: str, vm_id: str) -> tuple[socket.socket, dict[str, str]]:
        key = (kind, vm_id)
        with self._cond:
            if not self._cond.wait_for(lambda: key in self._waiting and self._waiting[key].ready,
                                       self.timeouts.vgpu):
                raise transport.TransportError(f"no {kind} connection arrived for VM {vm_id} "
                                               f"within {self.timeouts.vgpu:g} s")
            parked = self._waiting.pop(key)
            parked.taken.set()
            return parked.conn, parked.cookies


def route_of(request: transport.Request) -> tuple[str | None, str]:
    """The handler a request goes to (None: xenopsd answers 404) and the VM id its path names
    (a vGPU path names `<vm>.<device>`)."""
    if request.method != "PUT":
        return None, ""
    for prefix, route in ROUTES:
        if request.path.startswith(prefix):
            vm_id = request.path[len(prefix):]
            return route, vm_id.partition(".")[0] if route == ROUTE_VGPU else vm_id
    return None, ""


class MigrationRefused(Exception):
    """The vm connection cannot go on; the text is sent as the handshake's error."""


class IncomingMigration:
    def __init__(self, host: Host, conn: socket.socket, log: Logger, parked: ParkedStreams,
                 secret: str | None, timeouts: Timeouts, deadline: float, features: bytes = b"{}") -> None:
        self.secret = secret
        self.features = features   # the document FEATURES_PATH answers with
        self.deadline = deadline   # for the request's head (monotonic)
        self.timeouts = timeouts
        self.host = host
        self.conn = conn
        self.log = log
        self.parked = parked
        self.mem_conn: socket.socket | None = None      # the memory connection, once taken
        self.vgpu_conn: socket.socket | None = None     # the vGPU stream's connection, once taken
        self.vgpu_wrap: codecs.Wrap | None = None       # the codec's wrap of it, once the image asks
        self.restored = False      # past the stream: a shutdown lets the handshake finish
        self.handed_over = False   # a parked connection now owned by its vm connection's thread

    def time_left(self) -> float:
        return max(0.001, self.deadline - time.monotonic())

    def run(self) -> None:
        try:
            request = transport.read_request(self.conn, self.time_left())
        except transport.TransportError as e:
            self.log.warning(f"bad request: {e}")
            return
        if request.method == "GET" and request.path.startswith(transport.STATE_PATH):
            self._answer_state(request)
            return
        if request.method == "GET" and request.path == transport.FEATURES_PATH:
            self._answer_features(request)
            return
        route, vm_id = route_of(request)
        if route is None:
            transport.send_status(self.conn, 404, "Not Found")
            self.log.warning(f"refused {request.method} {request.path[:80]}")
            return
        refusal = self._refusal(request, route, vm_id)
        if refusal is not None:
            self.log.warning(f"refused {request.method} {request.path[:80]}: {refusal}")
            transport.send_result(self.conn, transport.xenopsd_error(refusal))
            return
        if route != ROUTE_VM:
            try:
                self.handed_over = self.parked.park(route, vm_id, self.conn, request.cookies, self.log)
            except StreamRefused as e:
                transport.send_result(self.conn, transport.xenopsd_error(str(e)))
                self.log.warning(f"refused {request.method} {request.path[:80]}: {e}")
            return
        try:
            self._receive(request, vm_id)
        finally:
            if self.vgpu_wrap is not None:
                self.vgpu_wrap.stop()
            for conn in (self.mem_conn, self.vgpu_conn):
                if conn is not None and conn is not self.conn:
                    conn.close()

    def _refusal(self, request: transport.Request, route: str, vm_id: str) -> str | None:
        """Why a migration route refuses the request at once (its first handshake message)."""
        refused = self._secret_refused(request)
        if refused is not None:
            return refused
        if not valid_uuid(vm_id):
            return "not a VM uuid"
        if route == ROUTE_VGPU and transport.COOKIE_VGPU_MIGRATION not in request.cookies:
            # xenops_server.ml receive_vgpu: only senders that send this cookie are accepted.
            return (f"VM.migrate: version of sending host incompatible with receiving host: "
                    f"no cookie {transport.COOKIE_VGPU_MIGRATION}")
        return None

    def _secret_refused(self, request: transport.Request) -> str | None:
        """Why the request's secret is refused; None: none is required, or it is the right one."""
        if self.secret is None or hmac.compare_digest(
                request.cookies.get(transport.SECRET_COOKIE, "").encode(), self.secret.encode()):
            return None
        return f"{'a wrong' if transport.SECRET_COOKIE in request.cookies else 'no'} migration secret"

    def _forbidden(self, request: transport.Request) -> bool:
        """Our GET routes answer only those who hold the secret (403 to others, logged)."""
        refused = self._secret_refused(request)
        if refused is not None:
            transport.send_status(self.conn, 403, "Forbidden")
            self.log.warning(f"refused {request.method} {request.path[:80]}: {refused}")
        return refused is not None

    def _answer_features(self, request: transport.Request) -> None:
        """Our extension: what this host accepts, for a source choosing its method (features.py)."""
        if not self._forbidden(request):
            transport.send_status(self.conn, 200, "OK", json_body=self.features)
            self.log.info("asked for the features this host accepts")

    def _answer_state(self, request: transport.Request) -> None:
        """Our extension: for a source whose commit went unconfirmed, did the VM start here?"""
        vm_uuid = request.vm_uuid
        if self._forbidden(request):
            return
        if not valid_uuid(vm_uuid):
            transport.send_status(self.conn, 404, "Not Found")
            return
        try:
            state = self.host.find(vm_uuid).state
        except DomainError:
            state = transport.STATE_ABSENT
        self.log.info(f"asked for the state of VM {vm_uuid}: {state}")
        transport.send_status(self.conn, 200, "OK")
        transport.send_line(self.conn, state)

    def _vgpu_fd(self, codec: codecs.Codec) -> int:
        """The vGPU stream's fd: its own connection, through its own wrap of the codec."""
        if self.vgpu_conn is None:
            raise transport.TransportError("the image has a vGPU stream but the VM has no vGPU connection")
        self.vgpu_wrap = codec.receiver(self.vgpu_conn.fileno(), relay_from=self.vgpu_conn)
        assert self.vgpu_wrap.fd is not None
        return self.vgpu_wrap.fd

    def _create(self, request: transport.Request, vm_id: str) -> tuple[Domain, frozenset[str]]:
        """Up to synchronisation point 1: the cookies checked, the extensions announced if asked,
        the vGPU connection taken (after its 1-vgpu ACK), the domain created."""
        cookies = request.cookies
        for required in (transport.COOKIE_DBG, transport.COOKIE_MEMORY_LIMIT):
            if required not in cookies:
                raise MigrationRefused(f"no cookie {required}")
        limit = cookies[transport.COOKIE_MEMORY_LIMIT]
        if not limit.isdigit():
            raise MigrationRefused(f"invalid memory_limit {limit[:40]!r}")
        final_id = cookies.get(transport.COOKIE_FINAL_ID, vm_id)
        if not valid_uuid(final_id):
            raise MigrationRefused("final_id is not a VM uuid")
        agreed: frozenset[str] = frozenset()
        if transport.EXTENSIONS_COOKIE in cookies:
            agreed = frozenset(cookies[transport.EXTENSIONS_COOKIE].split(",")) & frozenset(transport.EXTENSIONS)
            transport.send_result(self.conn, transport.EXT_ANNOUNCE + ",".join(sorted(agreed)))
        if transport.METADATA_COOKIE not in cookies:
            raise MigrationRefused(f"VM {final_id} is unknown here: no {transport.METADATA_COOKIE} cookie "
                                   "(this project's substitute for VM.import_metadata)")
        try:
            meta = parse_vm_metadata(cookies[transport.METADATA_COOKIE].encode(),
                                     what=f"the {transport.METADATA_COOKIE} cookie")
        except image.ImageError as e:
            raise MigrationRefused(f"VM metadata: {e}") from None
        if meta["uuid"] != final_id:
            raise MigrationRefused(f"the metadata describes VM {meta['uuid']}, not VM {final_id}")
        if meta["vgpu_bytes"]:
            with self.parked.expecting(ROUTE_VGPU, vm_id):
                ack = transport.recv_result(self.conn, self.timeouts.vgpu, "the source's 1-vgpu ACK")
                if ack is not None:
                    raise MigrationRefused(f"source failed: {transport.describe_error(ack)}")
                self.vgpu_conn, _ = self.parked.take(ROUTE_VGPU, vm_id)
        try:
            domain = self.host.create_domain(meta["name"], int(limit), uuid=final_id,
                                             meta={"workload": meta["workload"], "vgpu_bytes": meta["vgpu_bytes"]})
        except (DomainError, ValueError) as e:
            raise MigrationRefused(str(e)) from None
        return domain, agreed

    def _receive(self, request: transport.Request, vm_id: str) -> None:
        codec = codecs.from_cookies(request.cookies)
        self.log.info(f"incoming migration of VM {vm_id}"
                      + (f" ({codec.cookie[0]}={request.cookies[codec.cookie[0]]})" if codec.cookie else ""))
        cpu = CpuAccounting(own=time.thread_time)       # this migration's thread of the shim
        try:
            domain, agreed = self._create(request, vm_id)
        except (MigrationRefused, transport.TransportError) as e:
            self._fail(str(e))
            return
        try:
            with self.parked.expecting(ROUTE_MEM, vm_id):
                transport.send_result(self.conn)                           # point 1
                self.log.info(f"synchronisation point 1: domain {domain.domid} created for VM {domain.name}")
                if transport.COOKIE_MEM_MIGRATION in request.cookies:
                    ack = transport.recv_result(self.conn, self.timeouts.vgpu, "the source's 1-mem ACK")
                    if ack is not None:
                        raise transport.TransportError(f"source failed: {transport.describe_error(ack)}")
                    self.mem_conn, _ = self.parked.take(ROUTE_MEM, vm_id)
                else:
                    self.mem_conn = self.conn        # an older sender: the image follows on this connection
        except transport.TransportError as e:
            domain.destroy()
            self._fail(str(e))
            return
        mem = self.mem_conn
        try:
            wrap = codec.receiver(mem.fileno(), relay_from=mem)
        except codecs.ERRORS as e:
            domain.destroy()
            self._fail(str(e))
            return
        assert wrap.fd is not None
        reader = ImageReader(self.host, wrap.fd, log=self.log,
                             vgpu_fd=lambda: self._vgpu_fd(codec), uuid=domain.uuid, domain=domain, cpu=cpu)
        wraps = lambda: [w for w in (wrap, self.vgpu_wrap) if w is not None]  # noqa: E731
        try:
            reader.run()
            for w in wraps():
                w.finish()     # each stream has ended: its codec must have ended cleanly too
                cpu.add_codec(w.cpu)
        except Exception as e:
            failure = next(filter(None, (w.settle() for w in wraps())), None)
            domain.destroy()
            self._fail(f"restore failed: {failure or e}", linger=True)
            return
        finally:
            wrap.stop()
        self.restored = True
        self.log.info("synchronisation point 2: image restored")
        try:
            if transport.EXT_VERIFY in agreed:
                self._verify(domain)
            commit = transport.recv_result(self.conn, self.timeouts.handshake, "the source's commit (point 3)")
            if commit is not None:
                raise transport.TransportError(f"source failed: {transport.describe_error(commit)}")
            domain.unpause()
        except Exception as e:
            domain.destroy()
            self._fail(str(e))
            return
        try:
            transport.send_result(self.conn)                           # point 4
            if transport.EXT_STATS in agreed:
                stats = {"cpu_seconds": cpu.by_role()}
                transport.send_result(self.conn, json.dumps(stats))
            self._linger()     # the source reads its stream connections' counters before it closes
        except transport.TransportError:
            pass   # the VM runs here now; the source learns by its own timeout, or asks
        self.log.info(f"VM {domain.name} (domid {domain.domid}) restored and running")
        domain.close()         # the VM belongs to the host now, not to this long-lived process

    def _verify(self, domain: Domain) -> None:
        """Our extension: the source's digest of every page at the pause point, answered."""
        digest = transport.recv_result(self.conn, self.timeouts.handshake, "the source's digest")
        if digest != memory_digest(domain.memory):
            raise transport.TransportError("verification failed: restored memory differs from the source's "
                                           "memory at the pause point")
        transport.send_result(self.conn)
        self.log.info(f"VM {domain.name}: every page verified")

    def _fail(self, text: str, linger: bool = False) -> None:
        """The error as xenopsd sends it; `linger`: sent early (the source may still be writing),
        so wait for the source to read it and close rather than reset the connection on it."""
        self.log.warning(text)
        try:
            transport.send_result(self.conn, transport.xenopsd_error(text))
            if linger:
                self._linger()
        except transport.TransportError:
            pass

    def _linger(self) -> None:
        """Said all on the vm connection: wait (briefly) for the source to close it, reading
        what it still sends, so that nothing resets the connection on unread bytes."""
        try:
            self.conn.shutdown(socket.SHUT_WR)
            deadline = time.monotonic() + LINGER
            poller = select.poll()
            poller.register(self.conn, select.POLLIN | select.POLLRDHUP)
            while time.monotonic() < deadline and poller.poll(int(LINGER * 1000)):
                if not self.conn.recv(1 << 16):
                    break
        except OSError:
            pass
