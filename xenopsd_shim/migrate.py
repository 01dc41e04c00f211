"""The sending side of a migration: xenopsd's three connections and its handshake.

The order is xenops_server.ml VM_migrate's: the vm connection (the destination
creates the domain and answers, synchronisation point 1; with a vGPU its own
connection is answered and acknowledged first), the mem connection (answered,
acknowledged), the save (point 2), the source's Success (point 3, the commit)
and the destination's answer once the VM runs there (point 4). A destination
that cannot take the VM says so at point 1, before emu-manager ever runs here.

The source keeps its (paused) copy until the destination says the VM runs
there; any failure before the commit unpauses it here, so the VM always runs
on exactly one host. After the commit, a lost or failed point 4 is settled by
asking the destination (our extension): running there completes the
migration, no copy there resumes it here, and no answer leaves it paused here
for an operator, since running it could make two.
"""
from __future__ import annotations

import json
import socket
import ssl
import time
import uuid as uuidlib
from dataclasses import dataclass, field, replace
from typing import Any, Callable

from xenemu import Domain, Host
from xenemu.memory import memory_digest
from xenmig import emp

from . import cancel, codecs, features, tlstunnel, transport
from .zstdpipe import KILLED_GRACE
from .accounting import CpuAccounting
from .codecs import Codec
from .imagewriter import ImageWriter, Progress, SaveStats, vm_metadata
from .inband import ConvergenceWatch, InBand, SwitchRefused
from .log import Logger
from .migctl import ControlServer
from .phases import phases
from .policy import is_same_host
from .timeouts import Timeouts


INSTANCE_ID = str(uuidlib.uuid4())    # as xenopsd's instance_id: one per sending process
VGPU_DEVICE = "0"                     # the VM's one vGPU, as VGPU_DB numbers its device


def temporary_id(vm_uuid: str) -> str:
    """The uuid the destination knows the VM by during the migration (xenops_server.ml
    VM.migrate's tmp_uuid_of ~kind:`dest): its first 24 characters, then 000000000001."""
    return vm_uuid[:24] + "000000000001"


class MigrationError(Exception):
    """A migration failed; the text is the one line the user sees, `exit_code` the status
    (None: the ordinary failure status; a cancelled migration exits as its signal says)."""

    def __init__(self, text: str, exit_code: int | None = None) -> None:
        super().__init__(text)
        self.exit_code = exit_code


@dataclass(frozen=True)
class Options:
    live: bool = True
    verify: bool = False
    codec: Codec = codecs.NONE
    max_bandwidth: int | None = None   # bytes/s, paced by the kernel on the socket
    secret: str | None = None          # the destination's migration secret
    timeouts: Timeouts = Timeouts()
    tls: ssl.SSLContext | None = None  # trust for the destination's certificate, when TLS is on
    delta_cache: int = 0               # xenopsd.conf's migration-delta-cache, in bytes


class Stream:
    """One stream's connection, and its codec's wrap of it."""

    def __init__(self, name: str, sock: socket.socket, codec: Codec) -> None:
        self.name = name
        self.sock = sock
        self.wrap = codec.sender(sock.fileno())

    @property
    def fd(self) -> int:
        """Where the stream's writers write: the codec's input (the socket itself for most)."""
        return self.wrap.fd if self.wrap.fd is not None else self.sock.fileno()

    def finish(self) -> None:
        """The stream is complete: the codec drained, and the connection ended for writing, as
        VM_migrate's save closes the mem connection before point 3. (Not through a TLS tunnel:
        TLS cannot half-close, so the tunnel would end the connection, and the count of its
        bytes on the wire with it; that one ends with the migration.)"""
        self.wrap.finish()
        if not isinstance(self.sock, tlstunnel.TunnelSocket):
            try:
                self.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    def stop(self) -> tuple[str | None, bool]:
        """End the stream's codec; why it had failed, if it had, and whether a signal killed it
        (a root cause) rather than an error exit (often a consequence: the peer went away). A
        codec killed under its writer closes the pipe before it can be reaped, so the writer's
        EPIPE can arrive first: it gets a moment to show its end."""
        failure = self.wrap.settle(KILLED_GRACE)
        killed = self.wrap.killed
        self.wrap.stop()
        return failure, killed


@dataclass
class Transfer:
    """What the migration has opened so far: what a failure has to stop and close."""
    conns: dict[str, socket.socket] = field(default_factory=dict)   # by role: vm, memory, vgpu
    streams: list[Stream] = field(default_factory=list)
    writer: ImageWriter | None = None
    stats: SaveStats = field(default_factory=SaveStats)


@dataclass(frozen=True)
class Failures:
    """What else went wrong, collected once a migration failed."""
    codecs: tuple[tuple[str, bool], ...] = ()     # each failed codec: why, and whether a signal killed it
    # The destination's own words; a question (it waits up to half a second), asked only when
    # nothing ranked above them explains the failure.
    destination: Callable[[], MigrationError | None] = lambda: None


def failure_reason(seen: BaseException, failures: Failures) -> BaseException:
    """The one reason the user is told, by rank: a cancellation is what the user did; else a codec
    of ours killed by a signal explains the rest; else the destination's own words; else our
    codec's error; else what we saw."""
    if isinstance(seen, cancel.Cancelled):
        return seen
    killed = next((text for text, by_signal in failures.codecs if by_signal), None)
    if killed is not None:
        return MigrationError(killed)
    said = failures.destination()
    if said is not None:
        return said
    if failures.codecs:
        return MigrationError(failures.codecs[0][0])
    return seen


class SourceMigration:
    def __init__(self, host: Host, domain: Domain, dest: str, options: Options, log: Logger,
                 on_info: Progress = lambda p, s: None) -> None:
        self.host = host
        self.domain = domain
        self.dest = dest
        self.options = options
        self.log = log
        self.on_info = on_info
        self.opened_at: float | None = None     # the connections made (the summary's phases)
        self.committed = False       # told the destination to start the VM
        self.agreed: frozenset[str] = frozenset()   # our extensions, as both sides announced them
        self.left_paused: str | None = None     # why: it could not say whether it started it
        self.running_at: float | None = None    # when the destination said the VM runs (point 4)
        self.choice = features.Choice(options.codec, options.codec, "")   # the method, once negotiated
        self.delta: tuple[int, str] = (0, "not negotiated")    # the delta cache's bound, and why
        self.inband = self._in_band(options.codec)

    def _in_band(self, codec: Codec) -> InBand:
        """The in-band account of a migration by this method: the policy's first mode, its watch."""
        return InBand(self.log, start_mode=codec.in_band_start,
                      watch=ConvergenceWatch() if codec.converge_watch else None)

    def _switch(self, mode: str, level: int | None) -> str:
        """A vm-compress request (on the control socket's thread): the "ok" line, or it raises.
        A method that did not negotiate in-band records (none) asks the destination first."""
        codec = self.options.codec
        if not codec.switchable:
            raise SwitchRefused(f"the {codec.name} method compresses the whole stream outside "
                                "xenguest: in-band compression cannot be switched")
        if mode != emp.MODE_OFF and not features.in_band(codec):
            doc, why = features.ask(self.dest, self._query_cookies(self._cookies()), self.options.timeouts,
                                    self.options.tls)
            if doc is None or not features.accepts_in_band(doc):
                raise SwitchRefused(f"the destination {why or 'does not accept in-band compressed records'}")
        switch = self.inband.switch(mode, level)
        return f"ok {switch.mode} {switch.level} {switch.iteration}"

    def _cookies(self) -> dict[str, str]:
        """xenopsd's cookies on every connection, plus our secret."""
        cookies = {transport.COOKIE_INSTANCE_ID: INSTANCE_ID, transport.COOKIE_FINAL_ID: self.domain.uuid,
                   transport.COOKIE_DBG: f"migrate-{self.domain.uuid}",
                   transport.COOKIE_MEM_MIGRATION: transport.MEM_MIGRATION_VERSION}
        if self.options.codec.cookie:
            key, value = self.options.codec.cookie     # the receiver decides from this alone
            cookies[key] = value
        if self.options.secret:
            cookies[transport.SECRET_COOKIE] = self.options.secret
        return cookies

    def run(self) -> dict[str, Any]:
        """Connect, send the image, conclude; after a failure, settle where the VM runs. The
        summary (`vm-migrate --json`), or MigrationError with the one line the user sees."""
        t0 = time.monotonic()
        was_running = self.domain.state == "running"
        self._negotiate()
        cookies = self._cookies()
        if is_same_host(self.host, self.dest):
            self.domain.mark_outgoing(True)     # lets this host's receiver restore a copy beside it
        transfer = Transfer()
        cpu = CpuAccounting()
        control = ControlServer(self.host.migration_socket(self.domain.domid), self._switch)
        try:
            self._open(transfer.conns, cookies)
            self._send_image(transfer, cpu)
            remote = self._conclude(transfer.conns["vm"])
        except BaseException as e:
            reason = self._abandon(e, transfer)
            wire = self._end(transfer.conns)
            remote = self._settle(reason, was_running, cookies)
        else:
            wire = self._end(transfer.conns)
        finally:
            control.close()
        done = time.monotonic()
        self.domain.destroy()
        return self._summary(transfer.stats, wire, cpu.by_role(), remote, t0, done)

    def _negotiate(self) -> None:
        """Before anything is held: a method that needs the destination's support (in-band records)
        only if its features say so, else `stream` with one warning; the choice is the summary's."""
        requested = self.options.codec
        doc: features.Features | None = None
        why = ""
        if features.in_band(requested):
            try:
                doc, why = features.ask(self.dest, self._query_cookies(self._cookies()), self.options.timeouts,
                                        self.options.tls)
            except transport.TransportError as e:
                raise MigrationError(self._describe(e)) from None
            except cancel.Cancelled as e:
                raise MigrationError(self._describe(e), e.exit_code) from None
        self.choice = features.choose(self.dest, requested, doc, why)
        if self.choice.fallback:
            self.log.warning(f"migrating VM {self.domain.name} with {self.choice.codec.name}, not {requested.name}: "
                             f"{self.choice.reason}")
            self.options = replace(self.options, codec=self.choice.codec)
            self.inband = self._in_band(self.choice.codec)
        else:
            self.log.info(f"migrating VM {self.domain.name} with {requested.name}: {self.choice.reason}")
        self.delta = features.delta_cache(doc, self.choice.codec, self.options.delta_cache, self.domain.memory_bytes)
        self.log.info(f"migrating VM {self.domain.name}: delta encoding {'on' if self.delta[0] else 'off'}: "
                      f"{self.delta[1]}")

    def _send_image(self, transfer: Transfer, cpu: CpuAccounting) -> None:
        """The suspend image through each stream's codec, then every stream ended (point 2);
        the CPU of the processes reaped meanwhile (emu-manager and its emulators, zstd) to `cpu`."""
        codec = self.options.codec
        transfer.streams = [Stream("memory", transfer.conns["memory"], codec)]
        if "vgpu" in transfer.conns:
            # The xenguest codec leaves it as it is (xenguest compresses memory only).
            transfer.streams.append(Stream("vgpu", transfer.conns["vgpu"], codec))
        memory, vgpu = transfer.streams[0], transfer.streams[1:]
        vm = transfer.conns["vm"]
        transfer.writer = ImageWriter(self.domain, memory.fd, live=self.options.live, codec=codec, log=self.log,
                                      on_info=self.on_info, vgpu_fd=vgpu[0].fd if vgpu else None,
                                      watch=lambda: self._watch_destination(vm), inband=self.inband,
                                      delta_cache=self.delta[0])
        transfer.stats = transfer.writer.run()
        transfer.writer.account(cpu)
        transfer.writer.close()
        for stream in transfer.streams:
            stream.finish()
            cpu.add_codec(stream.wrap.cpu)
        self.log.info("synchronisation point 2: image sent")

    def _abandon(self, seen: BaseException, transfer: Transfer) -> BaseException:
        """After a failure, our side stops (a second signal cannot cut this short): the writer and
        its emu-manager released, the codecs stopped. The one reason the user will be told."""
        cancel.ignore()
        if transfer.writer is not None:
            transfer.writer.close()
        if self.domain.outgoing:
            self.domain.mark_outgoing(False)
        codecs = tuple((why, killed) for why, killed in (stream.stop() for stream in transfer.streams) if why)
        vm = transfer.conns.get("vm")
        if vm is None or transfer.writer is None:
            return failure_reason(seen, Failures(codecs))
        return failure_reason(seen, Failures(codecs, destination=lambda: self._destination_error(vm)))

    def _settle(self, reason: BaseException, was_running: bool, cookies: dict[str, str]) -> dict[str, Any]:
        """After a failure the VM runs on one host: the destination's, if it runs it after all (the
        migration is complete; no statistics from it), else MigrationError."""
        if not self._fall_back(was_running, cookies):
            exit_code = reason.exit_code if isinstance(reason, cancel.Cancelled) else None
            raise MigrationError(self._describe(reason), exit_code) from None
        self.log.warning(f"VM {self.domain.name}: its start was not confirmed ({reason}), "
                         "but the destination reports it running: the migration is complete")
        return {}

    def _summary(self, stats: SaveStats, wire: dict[str, int], cpu: dict[str, float], remote: dict[str, Any],
                 t0: float, done: float) -> dict[str, Any]:
        return {
            "status": "success", "vm": self.domain.name, "uuid": self.domain.uuid, "dest": self.dest,
            "mode": self.options.codec.name, "method": self.choice.codec.name,
            "method_requested": self.choice.requested.name,
            "method_reason": self.choice.reason, "live": self.options.live, "verified": self.options.verify,
            "total_seconds": round(done - t0, 3),
            # The paused window: from the pause to the destination's word that the VM runs (or, when
            # that word was lost and the state asked for, to the end).
            "downtime_seconds": round((self.running_at or done) - stats.paused_at, 3) if stats.paused_at else None,
            "iterations": stats.iterations, "pages_sent": stats.pages, "zero_pages": stats.zero_pages,
            "memory_bytes": self.domain.memory_bytes, "vgpu_bytes": self.domain.vgpu_bytes,
            "wire_bytes": sum(wire.values()), "wire_bytes_per_stream": wire,
            "compression_ratio": round(self.domain.memory_bytes / wire["memory"], 3) if wire["memory"] else None,
            "cpu_seconds": {"source": cpu, "destination": remote.get("cpu_seconds", {})},
            "emu_manager_argv": stats.emu_argv,
            "phases": phases(t0, self.opened_at, stats.first_page_at, stats.last_page_at, self.running_at, done),
            **self.inband.summary(),
            "delta": {"cache_bound_bytes": self.delta[0], "reason": self.delta[1], **self.inband.delta_totals()},
        }

    def _connect(self, path: str, cookies: dict[str, str]) -> socket.socket:
        return transport.open_stream(self.dest, path, cookies, self.options.timeouts,
                                     self.options.max_bandwidth, self.options.tls)

    def _open(self, conns: dict[str, socket.socket], cookies: dict[str, str]) -> None:
        """Connections and synchronisation points 1-vgpu, 1 and 1-mem, in VM_migrate's order;
        `agreed` learns the extensions both sides announced."""
        dest_id = temporary_id(self.domain.uuid)
        meta = self.domain.reload()
        asked = [transport.EXT_STATS, transport.EXT_STATE] + ([transport.EXT_VERIFY] if self.options.verify else [])
        conns["vm"] = vm = self._connect(transport.MIGRATE_VM_PATH + dest_id, {
            **cookies, transport.COOKIE_MEMORY_LIMIT: str(meta["memory_bytes"]),
            transport.COOKIE_MEMORY_TOTAL_SOURCE: str(meta["memory_bytes"]),
            transport.METADATA_COOKIE: vm_metadata(self.domain).decode(),
            transport.EXTENSIONS_COOKIE: ",".join(asked)})
        if self.domain.vgpu_bytes:
            conns["vgpu"] = self._connect(f"{transport.MIGRATE_VGPU_PATH}{dest_id}.{VGPU_DEVICE}",
                                          {**cookies, transport.COOKIE_VGPU_MIGRATION: ""})
            self._expect_success(conns["vgpu"], "the destination's vGPU connection (point 1-vgpu)")
            transport.send_result(vm)                             # 1-vgpu ACK
        answer = transport.recv_result(vm, self.options.timeouts.handshake, "the destination to create the VM")
        if answer is not None and answer.startswith(transport.EXT_ANNOUNCE):
            self.agreed = frozenset(answer[len(transport.EXT_ANNOUNCE):].split(",")) & frozenset(asked)
            answer = transport.recv_result(vm, self.options.timeouts.handshake, "the destination to create the VM")
        if answer is not None:
            raise MigrationError(f"destination failed: {transport.describe_error(answer)}")
        self.log.info("synchronisation point 1: the destination created the VM")
        if self.options.verify and transport.EXT_VERIFY not in self.agreed:
            raise MigrationError("the destination cannot verify memory (--verify): it did not announce it")
        conns["memory"] = self._connect(transport.MIGRATE_MEM_PATH + dest_id, cookies)
        self._expect_success(conns["memory"], "the destination's memory connection (point 1-mem)")
        transport.send_result(vm)                                 # 1-mem ACK
        self.opened_at = time.monotonic()

    def _conclude(self, vm: socket.socket) -> dict[str, Any]:
        """After the image: our verification if agreed, then points 3 and 4, then our statistics."""
        timeout = self.options.timeouts.handshake
        if transport.EXT_VERIFY in self.agreed:
            transport.send(vm, transport.build_result(memory_digest(self.domain.memory)))
            self._expect_success(vm, "the destination's verification")
        # A destination that hung up while the image's last bytes still fitted in the sockets'
        # buffers (its receiver killed near the end: a delta-sized final copy) must be seen before
        # the commit, not after: once committed, the source cannot tell and leaves the VM paused.
        self._watch_destination(vm)
        transport.send_result(vm)                                 # point 3: the destination may run it
        self.committed = True
        answer = transport.recv_result(vm, timeout, "the destination to start the VM")
        if answer is not None:
            raise MigrationError(f"destination failed to start the VM: {transport.describe_error(answer)}")
        self.running_at = time.monotonic()
        self.log.info("synchronisation point 4: the VM runs on the destination")
        if transport.EXT_STATS not in self.agreed:
            return {}
        try:
            return json.loads(transport.recv_result(vm, timeout, "the destination's statistics") or "{}")
        except (transport.TransportError, ValueError) as e:
            self.log.warning(f"no statistics from the destination: {e}")
            return {}

    def _expect_success(self, sock: socket.socket, what: str) -> None:
        answer = transport.recv_result(sock, self.options.timeouts.handshake, what)
        if answer is not None:
            raise MigrationError(f"destination failed: {transport.describe_error(answer)}")

    @staticmethod
    def _watch_destination(vm: socket.socket) -> None:
        """While the image is written the destination says nothing on the vm connection, unless
        it gives up (its point-4 error, early) or hangs up; then the source stops now instead of
        when its own writers notice (a writer blocked on something else might never)."""
        try:
            data = vm.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return
        except OSError as e:
            raise MigrationError(f"connection to the destination lost: {e.strerror or e}") from None
        if not data:
            raise MigrationError("the destination closed the connection")
        raise MigrationError("the destination gave up")

    @staticmethod
    def _destination_error(vm: socket.socket) -> MigrationError | None:
        """When the destination gave up first, its own words explain the failure best."""
        try:
            answer = transport.recv_result(vm, 0.5, "the destination's error")
        except transport.TransportError:
            return None
        return None if answer is None else MigrationError(f"destination failed: {transport.describe_error(answer)}")

    @staticmethod
    def _end(conns: dict[str, socket.socket]) -> dict[str, int]:
        """Close every connection; the bytes each put on the wire."""
        wire = {"memory": 0, **{name: transport.tcp_bytes(sock)[0] for name, sock in conns.items()}}
        for sock in conns.values():           # (closing one may end the others at the destination)
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()
        return wire

    def _fall_back(self, was_running: bool, cookies: dict[str, str]) -> bool:
        """After a failure: whether the destination runs the VM after all (a commit whose
        confirmation was lost); else the source copy runs again, unless the destination may
        yet start it (it cannot say), when it stays paused so two copies never run."""
        if self.committed:
            state = self._settled_state(cookies) if transport.EXT_STATE in self.agreed \
                else "it does not answer state queries"
            if state == "running":
                return True
            if state != transport.STATE_ABSENT:
                self.left_paused = f"the destination was told to start it and cannot say whether it did: {state}"
                self.log.info(f"VM {self.domain.name}: {self.left_paused}; leaving the source copy paused")
                return False
            self.log.info(f"VM {self.domain.name}: the destination has no copy after the commit")
        if was_running and self.domain.state == "paused":
            self.domain.unpause()
            self.log.info(f"VM {self.domain.name} unpaused on the source after the failure")
        return False

    @staticmethod
    def _query_cookies(cookies: dict[str, str]) -> dict[str, str]:
        """What a GET on our extension routes carries of the migration's cookies."""
        return {k: v for k, v in cookies.items() if k in (transport.SECRET_COOKIE, transport.COOKIE_DBG)}

    def _settled_state(self, cookies: dict[str, str]) -> str:
        """The destination's state of the VM once it has decided (running, or absent because it
        destroyed its copy), polled for up to the connect timeout; or why that is unknown."""
        query = self._query_cookies(cookies)
        deadline = time.monotonic() + self.options.timeouts.connect
        while True:
            try:
                state = transport.query_state(self.dest, self.domain.uuid, query, self.options.timeouts,
                                              self.options.tls)
            except transport.TransportError as e:
                return f"no answer: {e}"
            if state in ("running", transport.STATE_ABSENT) or time.monotonic() > deadline:
                return state
            time.sleep(0.2)

    def _describe(self, e: BaseException) -> str:
        where = f"VM {self.domain.name} left paused on this host ({self.left_paused})" if self.left_paused \
            else f"VM {self.domain.name} keeps running on this host"
        if isinstance(e, cancel.Cancelled):
            return f"migration cancelled by {e.signame}; {where}"
        return f"migration failed: {e}; {where}"
