"""The legacy `stream` method's wrap (codecs.STREAM): an external zstd between the stream fd and the socket.

Sender: whatever writes the image writes into a pipe read by
`nice -n 19 ionice -c 3 /usr/bin/zstd --fast`, whose stdout is the socket.
Receiver: `nice -n 19 ionice -c 3 /usr/bin/zstd --decompress --stdout` reads
the socket and writes a pipe from which the image is read. Both as the real
xenopsd runs them: xapi_compression.ml's `go` lowers the priority of the
zstd it starts in either direction (lower_priority).
"""
from __future__ import annotations

import os
import select
import socket
import subprocess
import threading

from xenmig.procwait import Exit, wait_exit, wait_or_kill

from .zstdframe import FrameError, relay_one_frame

ZSTD = "/usr/bin/zstd"
LOWER_PRIORITY = ["nice", "-n", "19", "ionice", "-c", "3"]
COMPRESS_ARGV = [*LOWER_PRIORITY, ZSTD, "--fast"]
DECOMPRESS_ARGV = [*LOWER_PRIORITY, ZSTD, "--decompress", "--stdout"]
EXIT_TIMEOUT = 60.0
# A decompressor killed under its reader ends within ms, but its reader can see the stream cut and
# report first: after a failure, this long is given for its end to show before blaming the reader.
KILLED_GRACE = 0.2


class ZstdError(Exception):
    pass


class Zstd:
    """One zstd process between `far_fd` (a socket or file) and a pipe; `fd` is our end of the
    pipe (write end to compress, read end to decompress). A decompressor reading a socket is
    fed one frame by a relay thread (`zstdframe`), so it sees end of input where the frame ends."""

    def __init__(self, compress: bool, far_fd: int, relay_from: socket.socket | None = None) -> None:
        self.compress = compress
        self.name = "zstd --fast" if compress else "zstd --decompress"
        self.relay_error: str | None = None
        self.cpu: float | None = None       # once reaped (wait4), for the migration's accounting
        self._relay: threading.Thread | None = None
        r, w = os.pipe()
        ours, theirs = (w, r) if compress else (r, w)
        feed_r, feed_w = os.pipe() if relay_from is not None else (far_fd, -1)
        try:
            self.proc = subprocess.Popen(COMPRESS_ARGV if compress else DECOMPRESS_ARGV,
                                         stdin=theirs if compress else feed_r,
                                         stdout=far_fd if compress else theirs,
                                         stderr=subprocess.PIPE, start_new_session=True)
        except OSError as e:
            for fd in (r, w, *((feed_r, feed_w) if relay_from is not None else ())):
                os.close(fd)
            raise ZstdError(f"cannot start zstd: {e.strerror}") from None
        os.close(theirs)
        self.fd: int | None = ours
        if relay_from is not None:
            os.close(feed_r)
            self._relay = threading.Thread(target=self._feed, args=(relay_from, feed_w), daemon=True)
            self._relay.start()

    def _feed(self, sock: socket.socket, feed_w: int) -> None:
        try:
            relay_one_frame(sock, feed_w)
        except (BlockingIOError, TimeoutError):    # the socket's timeouts (see timeouts.arm)
            self.relay_error = "stream stalled: nothing arrived within the socket's timeout"
        except (FrameError, OSError) as e:
            self.relay_error = f"compressed stream broken: {e}"
        finally:
            os.close(feed_w)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def killed(self) -> bool:
        """A signal ended it: a root cause, where an error exit is often a consequence."""
        return (self.proc.returncode or 0) < 0

    def _reaped(self, ended: Exit | None) -> None:
        if ended is not None and self.cpu is None:
            self.cpu = ended.cpu

    def close_fd(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def failure(self) -> str | None:
        """Why zstd failed, if it has exited with an error (or its input broke)."""
        code = self.proc.poll()
        if code is None or code == 0:
            return self.relay_error
        detail = self.proc.stderr.read().decode(errors="replace").strip().splitlines() if self.proc.stderr else []
        how = f"was killed by signal {-code}" if code < 0 else f"exited with status {code}"
        return f"{self.name} {how}" + (f": {detail[-1]}" if detail else "")

    def settle(self, timeout: float = EXIT_TIMEOUT) -> str | None:
        """After its writer (or reader) failed: why zstd failed first, if it did (a full disk under
        a compressor, or a decompressor killed, is the cause; the other side's EPIPE or cut stream
        only its echo). A compressor's input is closed and it is waited for (a healthy one exits 0);
        a decompressor may still be waiting for input, so it gets KILLED_GRACE to show its end."""
        if self.compress:
            self.close_fd()
        self._reaped(wait_exit(self.proc, timeout if self.compress else min(timeout, KILLED_GRACE)))
        return self.failure()

    def finish(self) -> None:
        """The stream is complete: let zstd see the end of it and exit; it must exit 0."""
        if self.compress:
            self.close_fd()
        elif self.fd is not None and select.select([self.fd], [], [], EXIT_TIMEOUT)[0] and os.read(self.fd, 1):
            # zstd would block writing what nobody reads: fail now, not after EXIT_TIMEOUT.
            raise ZstdError("the compressed stream goes on after the end of the image")
        self._reaped(wait_or_kill(self.proc, EXIT_TIMEOUT))
        self.close_fd()
        if self._relay is not None:
            self._relay.join(timeout=EXIT_TIMEOUT)
        reason = self.failure()
        if reason:
            raise ZstdError(reason)

    def stop(self) -> None:
        """Any failure: end zstd now (idempotent)."""
        self.close_fd()
        self._reaped(wait_or_kill(self.proc, 0))
        if self.proc.stderr is not None:
            self.proc.stderr.close()
