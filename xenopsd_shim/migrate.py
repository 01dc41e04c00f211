"""The sending side of a migration: image over the transport, then the handshake.

The source keeps its (paused) copy until the destination says the VM is
restored and running; any failure before the commit unpauses it here, so the
VM always runs on exactly one host. After the commit, a lost confirmation is
settled by asking the destination: running there completes the migration, no
copy there resumes it here, and no answer leaves it paused here for an
operator, since running it could make two.
"""
from __future__ import annotations

import json
import socket
import ssl
import time
from dataclasses import dataclass
from typing import Any, Callable

from xenemu import Domain, Host
from xenemu.memory import memory_digest

from . import cancel, transport
from .accounting import CpuAccounting
from .imagewriter import ImageWriter
from .log import Logger
from .policy import MODE_NONE, MODE_STREAM, MODE_XENGUEST, is_same_host
from .timeouts import Timeouts
from .zstdpipe import Zstd


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
    mode: str = MODE_NONE         # none | stream | xenguest
    max_bandwidth: int | None = None   # bytes/s, paced by the kernel on the socket
    secret: str | None = None          # the destination's migration secret
    timeouts: Timeouts = Timeouts()
    tls: ssl.SSLContext | None = None  # trust for the destination's certificate, when TLS is on


class Stream:
    """One stream's connection, and the external zstd in front of it in `stream` mode."""

    def __init__(self, name: str, sock: socket.socket, compress: bool) -> None:
        self.name = name
        self.sock = sock
        self.zstd = Zstd(compress=True, far_fd=sock.fileno()) if compress else None

    @property
    def fd(self) -> int:
        """Where the stream's writers write: zstd's input, or the socket itself."""
        return self.zstd.fd if self.zstd is not None and self.zstd.fd is not None else self.sock.fileno()

    def finish(self) -> None:
        if self.zstd is not None:
            self.zstd.finish()

    def stop(self) -> tuple[str | None, bool]:
        """End the stream's zstd; why it had failed, if it had, and whether a signal killed it
        (a root cause) rather than an error exit (often a consequence: the peer went away)."""
        if self.zstd is None:
            return None, False
        failure = self.zstd.failure()
        killed = (self.zstd.proc.returncode or 0) < 0
        self.zstd.stop()
        return failure, killed


class SourceMigration:
    def __init__(self, host: Host, domain: Domain, dest: str, options: Options, log: Logger,
                 on_info: Callable[[int], None] = lambda p: None) -> None:
        self.host = host
        self.domain = domain
        self.dest = dest
        self.options = options
        self.log = log
        self.on_info = on_info
        self.committed = False       # told the destination to start the VM
        self.left_paused: str | None = None     # why: it could not say whether it started it

    def run(self) -> dict[str, Any]:
        t0 = time.monotonic()
        was_running = self.domain.state == "running"
        mode = self.options.mode
        cookies = {"dbg": f"migrate-{self.domain.uuid}"}
        if self.options.verify:
            cookies["verify"] = "true"
        if mode == MODE_STREAM:
            cookies["compress"] = "zstd"          # the receiver decides from this alone
        if self.options.secret:
            cookies[transport.SECRET_COOKIE] = self.options.secret
        if is_same_host(self.host, self.dest):
            self.domain.mark_outgoing(True)     # lets this host's receiver restore a copy beside it
        with CpuAccounting() as cpu:
            streams = [Stream("memory", self._connect(transport.MEMORY_PATH, cookies), mode == MODE_STREAM)]
            if self.domain.vgpu_bytes:
                # Its own connection; in-band mode leaves it uncompressed (xenguest compresses memory only).
                streams.append(Stream("vgpu", self._connect(transport.VGPU_PATH, cookies), mode == MODE_STREAM))
            main = streams[0]
            writer = ImageWriter(self.domain, main.fd, live=self.options.live, inband=mode == MODE_XENGUEST,
                                 log=self.log, on_info=self.on_info,
                                 vgpu_fd=streams[1].fd if len(streams) > 1 else None,
                                 watch=lambda: self._watch_destination(main.sock))
            try:
                stats = writer.run()
                writer.close()
                for stream in streams:
                    stream.finish()
                remote = self._handshake(main.sock)
            except BaseException as e:
                cancel.ignore()                                    # finish cleaning up first
                writer.close()
                if self.domain.outgoing:
                    self.domain.mark_outgoing(False)
                failures = [f for f in (stream.stop() for stream in streams) if f[0]]
                killed = [MigrationError(text) for text, by_signal in failures if by_signal]
                # A cancellation is what the user did; else a zstd of ours killed explains the
                # rest; else the destination's own words; else our zstd's error; else what we saw.
                cancelled = e if isinstance(e, cancel.Cancelled) else None
                reason = cancelled or next(iter(killed), None) or self._destination_error(main.sock) or \
                    next((MigrationError(text) for text, _ in failures), None) or e
                wire = self._end(streams)
                if not self._fall_back(was_running, cookies):
                    raise MigrationError(self._describe(reason), cancelled.exit_code if cancelled else None) from None
                self.log.warning(f"VM {self.domain.name}: its start was not confirmed ({reason or 'interrupted'}), "
                                 "but the destination reports it running: the migration is complete")
                remote = {}
            else:
                wire = self._end(streams)
        done = time.monotonic()
        self.domain.destroy()
        return {
            "status": "success", "vm": self.domain.name, "uuid": self.domain.uuid, "dest": self.dest,
            "mode": mode, "live": self.options.live, "verified": self.options.verify,
            "total_seconds": round(done - t0, 3),
            "downtime_seconds": round(done - stats.paused_at, 3) if stats.paused_at else None,
            "iterations": stats.iterations, "pages_sent": stats.pages, "zero_pages": stats.zero_pages,
            "memory_bytes": self.domain.memory_bytes, "vgpu_bytes": self.domain.vgpu_bytes,
            "wire_bytes": sum(wire.values()), "wire_bytes_per_stream": wire,
            "compression_ratio": round(self.domain.memory_bytes / wire["memory"], 3) if wire["memory"] else None,
            "cpu_seconds": {"source": cpu.by_role(), "destination": remote.get("cpu_seconds", {})},
            "emu_manager_argv": stats.emu_argv,
        }

    def _connect(self, path: str, cookies: dict[str, str]) -> socket.socket:
        return transport.open_stream(self.dest, path + self.domain.uuid, cookies, self.options.timeouts,
                                     self.options.max_bandwidth, self.options.tls)

    def _handshake(self, sock: socket.socket) -> dict[str, Any]:
        """After the image the destination speaks first (so its zstd can be stopped safely)."""
        remote: dict[str, Any] = {}
        while True:
            line = self._expect_success(sock, "the destination's restore result")
            if line.startswith(transport.HS_STATS):
                remote = json.loads(line[len(transport.HS_STATS):] or "{}")
            else:
                break
        if self.options.verify:
            digest = memory_digest(self.domain.memory)
            transport.send_line(sock, f"{transport.HS_VERIFY}{digest}")
            self._expect_success(sock, "the destination's verification")
        transport.send_line(sock, transport.HS_SUCCESS)           # commit: the destination may run it
        self.committed = True
        line = transport.recv_line(sock, self.options.timeouts.handshake, "the destination to start the VM")
        if line.startswith(transport.HS_ERROR):
            raise MigrationError(f"destination failed to start the VM: {line[len(transport.HS_ERROR):].strip()}")
        if line != transport.HS_SUCCESS:
            raise MigrationError(f"destination did not start the VM: {line[:80]!r}")
        return remote

    def _expect_success(self, sock: socket.socket, what: str) -> str:
        """The next handshake line: Success or Stats pass, Error raises."""
        line = transport.recv_line(sock, self.options.timeouts.handshake, what)
        if line.startswith(transport.HS_ERROR):
            raise MigrationError(f"destination failed: {line[len(transport.HS_ERROR):].strip()}")
        if line != transport.HS_SUCCESS and not line.startswith(transport.HS_STATS):
            raise MigrationError(f"unexpected handshake from destination: {line[:80]!r}")
        return line

    @staticmethod
    def _watch_destination(sock: socket.socket) -> None:
        """While the image is written the destination says nothing, unless it gives up (an
        `Error:` line, or it hangs up); then the source stops now instead of when its own
        writers notice (a writer blocked on something else might never). The destination's
        results may arrive before emu-manager's: those are left for the handshake."""
        try:
            data = sock.recv(len(transport.HS_ERROR), socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return
        except OSError as e:
            raise MigrationError(f"connection to the destination lost: {e.strerror or e}") from None
        if not data:
            raise MigrationError("the destination closed the connection")
        if data == transport.HS_ERROR.encode():        # (a shorter prefix of it: look again next time)
            raise MigrationError("the destination gave up")

    @staticmethod
    def _destination_error(sock: socket.socket) -> MigrationError | None:
        """When the destination gave up first, its own words explain the failure best."""
        try:
            line = transport.recv_line(sock, 0.5, "the destination's error")
        except transport.TransportError:
            return None
        if line.startswith(transport.HS_ERROR):
            return MigrationError(f"destination failed: {line[len(transport.HS_ERROR):].strip()}")
        return None

    @staticmethod
    def _end(streams: list[Stream]) -> dict[str, int]:
        """Close every stream's connection; the bytes each put on the wire."""
        wire = {}
        for stream in streams:
            wire[stream.name] = transport.tcp_bytes(stream.sock)[0]
            try:
                stream.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            stream.sock.close()
        return wire

    def _fall_back(self, was_running: bool, cookies: dict[str, str]) -> bool:
        """After a failure: whether the destination runs the VM after all (a commit whose
        confirmation was lost); else the source copy runs again, unless the destination may
        yet start it (it cannot say), when it stays paused so two copies never run."""
        if self.committed:
            state = self._settled_state(cookies)
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

    def _settled_state(self, cookies: dict[str, str]) -> str:
        """The destination's state of the VM once it has decided (running, or absent because it
        destroyed its copy), polled for up to the connect timeout; or why that is unknown."""
        query = {k: v for k, v in cookies.items() if k == transport.SECRET_COOKIE}
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
