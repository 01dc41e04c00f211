"""The legacy `stream` method: an external zstd between the stream fd and the socket.

Sender: whatever writes the image writes into a pipe read by
`nice -n 19 ionice -c 3 /usr/bin/zstd --fast`, whose stdout is the socket.
Receiver: `zstd --decompress --stdout` reads the socket and writes a pipe
from which the image is read. Both as the real xenopsd runs them.
"""
from __future__ import annotations

import os
import subprocess

ZSTD = "/usr/bin/zstd"
COMPRESS_ARGV = ["nice", "-n", "19", "ionice", "-c", "3", ZSTD, "--fast"]
DECOMPRESS_ARGV = [ZSTD, "--decompress", "--stdout"]
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
EXIT_TIMEOUT = 60.0


class ZstdError(Exception):
    pass


class Zstd:
    """One zstd process between `far_fd` (a socket or file) and a pipe; `fd` is our end of the
    pipe (write end to compress, read end to decompress)."""

    def __init__(self, compress: bool, far_fd: int) -> None:
        self.compress = compress
        self.name = "zstd --fast" if compress else "zstd --decompress"
        r, w = os.pipe()
        ours, theirs = (w, r) if compress else (r, w)
        try:
            self.proc = subprocess.Popen(COMPRESS_ARGV if compress else DECOMPRESS_ARGV,
                                         stdin=theirs if compress else far_fd,
                                         stdout=far_fd if compress else theirs,
                                         stderr=subprocess.PIPE, start_new_session=True)
        except OSError as e:
            os.close(r)
            os.close(w)
            raise ZstdError(f"cannot start zstd: {e.strerror}") from None
        os.close(theirs)
        self.fd: int | None = ours

    @property
    def pid(self) -> int:
        return self.proc.pid

    def close_fd(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def failure(self) -> str | None:
        """Why zstd failed, if it has exited with an error."""
        code = self.proc.poll()
        if code is None or code == 0:
            return None
        detail = self.proc.stderr.read().decode(errors="replace").strip().splitlines() if self.proc.stderr else []
        how = f"was killed by signal {-code}" if code < 0 else f"exited with status {code}"
        return f"{self.name} {how}" + (f": {detail[-1]}" if detail else "")

    def finish(self) -> None:
        """Sender: end of input; wait for zstd to flush and exit cleanly."""
        self.close_fd()
        try:
            self.proc.wait(timeout=EXIT_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        reason = self.failure()
        if reason:
            raise ZstdError(reason)

    def stop(self) -> None:
        """Receiver, or any failure: the stream is over (or abandoned); end zstd now."""
        self.close_fd()
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        if self.proc.stderr is not None:
            self.proc.stderr.close()
