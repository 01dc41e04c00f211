"""TLS for the migration transport, the way XenServer adds it: a tunnel, as stunnel is.

The emulators write and read the stream on a plain fd and know nothing of TLS,
so the TLS connection ends in this process and a relay thread joins it to one
end of a Unix socket pair; the other end is what the toolstack and the
emulators use, exactly as they use a TCP socket without TLS. The relay is an
asyncio loop (its SSL transport copes with renegotiation and partial records);
a write to the network that makes no progress within the stall timeout ends
the tunnel, and the emulators see their stream closed.
"""
from __future__ import annotations

import asyncio
import socket
import ssl
import struct
import threading
from pathlib import Path

CHUNK = 1 << 18
TCP_INFO_SIZE = 256
TCP_INFO_BYTES = (120, "<QQ")          # tcpi_bytes_acked, tcpi_bytes_received (Linux >= 4.1)


def tcp_counts(sock: socket.socket) -> tuple[int, int]:
    """(bytes acked, bytes received) from the kernel's TCP_INFO; (0, 0) where it has none."""
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, TCP_INFO_SIZE)
    except OSError:
        return 0, 0
    offset, fmt = TCP_INFO_BYTES
    if len(info) < offset + struct.calcsize(fmt):
        return 0, 0
    return struct.unpack_from(fmt, info, offset)


class WireSocket(socket.socket):
    """The TCP connection under the TLS. The relay's transport closes it as soon as the tunnel
    ends, which may be before the toolstack asks what went over it: its counts are kept from
    the moment before it closed."""

    final: tuple[int, int] | None = None

    def close(self) -> None:
        if self.final is None and self.fileno() >= 0:
            self.final = tcp_counts(self)
        super().close()

    def counts(self) -> tuple[int, int]:
        return self.final if self.final is not None else tcp_counts(self)


class TlsError(Exception):
    pass


def reason(e: OSError | ssl.SSLError) -> str:
    """An OSError's bare reason ("No such file or directory"), without errno and path noise."""
    return e.strerror if isinstance(e, OSError) and e.strerror else str(e)


def client_context(ca_file: Path) -> ssl.SSLContext:
    """Trust exactly the given CA (or self-signed certificate); check the destination's name."""
    try:
        return ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca_file))
    except (OSError, ssl.SSLError) as e:
        raise TlsError(f"cannot load TLS CA {ca_file}: {reason(e)}") from None


def server_context(cert_file: Path, key_file: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(str(cert_file), str(key_file))
    except (OSError, ssl.SSLError) as e:
        raise TlsError(f"cannot load TLS certificate {cert_file} / key {key_file}: {reason(e)}") from None
    return ctx


class TunnelSocket(socket.socket):
    """The local end of a tunnel; `wire` is the TCP socket under the TLS (for TCP_INFO)."""

    wire: WireSocket
    tunnel: "Tunnel"

    def close(self) -> None:
        super().close()
        if hasattr(self, "tunnel"):
            self.tunnel.join()


class Tunnel:
    def __init__(self, wire: socket.socket, ctx: ssl.SSLContext, *, server_side: bool,
                 server_hostname: str | None, handshake_timeout: float, stall_timeout: float) -> None:
        self.wire = WireSocket(wire.family, wire.type, wire.proto, fileno=wire.detach())
        self.ctx = ctx
        self.server_side = server_side
        self.server_hostname = server_hostname
        self.handshake_timeout = handshake_timeout
        self.stall_timeout = stall_timeout
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self._ours = ours
        self.local = TunnelSocket(fileno=theirs.detach())
        self.local.wire = self.wire
        self.local.tunnel = self
        self.error: str | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="tls-tunnel")
        self._thread.start()
        self._ready.wait()
        if self.error is not None:
            self.local.close()
            raise TlsError(self.error)

    def join(self) -> None:
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=self.stall_timeout + 5)

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except Exception as e:  # noqa: BLE001 - the thread's end is the tunnel's end; never a traceback
            self.error = self.error or str(e)
        finally:
            self._ready.set()
            self._ours.close()
            self.wire.close()

    async def _open_tls(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        loop = asyncio.get_running_loop()
        if not self.server_side:
            return await asyncio.open_connection(sock=self.wire, ssl=self.ctx, server_hostname=self.server_hostname,
                                                 ssl_handshake_timeout=self.handshake_timeout, limit=CHUNK)
        reader = asyncio.StreamReader(limit=CHUNK)
        protocol = asyncio.StreamReaderProtocol(reader)
        transport, _ = await loop.connect_accepted_socket(lambda: protocol, sock=self.wire, ssl=self.ctx,
                                                          ssl_handshake_timeout=self.handshake_timeout)
        return reader, asyncio.StreamWriter(transport, protocol, reader, loop)

    async def _main(self) -> None:
        try:
            tls_r, tls_w = await self._open_tls()
        except (ssl.SSLError, OSError, asyncio.TimeoutError) as e:
            why = getattr(e, "reason", None) or getattr(e, "strerror", None) or str(e) or "timed out"
            self.error = f"TLS handshake failed: {why}"
            return
        local_r, local_w = await asyncio.open_connection(sock=self._ours, limit=CHUNK)
        self._ready.set()
        ends = (tls_w, local_w)
        await asyncio.gather(self._pump(local_r, tls_w, ends, half_close=False),
                             self._pump(tls_r, local_w, ends, half_close=True))
        for w in ends:
            w.close()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    ends: tuple[asyncio.StreamWriter, ...], half_close: bool) -> None:
        """Copy until end of input. On any failure (a write that cannot drain within the stall
        timeout included) both ends are cut, so both peers see the stream end at once."""
        try:
            while data := await reader.read(CHUNK):
                writer.write(data)
                await asyncio.wait_for(writer.drain(), self.stall_timeout)
            if half_close and writer.can_write_eof():
                writer.write_eof()
            else:
                writer.close()         # TLS cannot half-close: end it once our side has said all
        except (OSError, ssl.SSLError, asyncio.TimeoutError):
            for w in ends:
                w.transport.abort()


def client(wire: socket.socket, ctx: ssl.SSLContext, hostname: str, handshake_timeout: float,
           stall_timeout: float) -> TunnelSocket:
    return Tunnel(wire, ctx, server_side=False, server_hostname=hostname, handshake_timeout=handshake_timeout,
                  stall_timeout=stall_timeout).local


def server(wire: socket.socket, ctx: ssl.SSLContext, handshake_timeout: float, stall_timeout: float) -> TunnelSocket:
    return Tunnel(wire, ctx, server_side=True, server_hostname=None, handshake_timeout=handshake_timeout,
                  stall_timeout=stall_timeout).local
