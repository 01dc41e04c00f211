"""The migration's compression methods, one codec per method, in one table.

As QEMU's multifd registers one ops struct per compression method, every
method is a `Codec` row of `CODECS`: its name (what xenopsd.conf's
`migration-compressor` and the summary's `mode` say), the cookie that tells
the receiver, the arguments it adds to emu-manager, and how it wraps a
stream's fd on the sending and on the receiving side. Migration, suspend to
a file and resume from a file use the same rows, so one send path and one
receive path serve every method; a new method is one row and its codec.

How a receiver recognises the method stays as xenopsd has it, and is read
here only: on a migration, the presence of a codec's cookie; on a suspend
file, its first bytes (`magic`). A codec with neither (`xenguest`) is seen
by nobody in the toolstack: xenguest's restorer knows its records by type
(`xenmig.compressed.REC_TYPE`), so the receiving toolstack passes it through
as `none`.
"""
from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import Protocol

from xenmig.compressed import ZSTD_MAGIC

from . import transport
from .zstdpipe import Zstd, ZstdError


class CodecError(Exception):
    """A codec failed; the text says how (a wrap's `settle` or `failure`, raised)."""


class Wrap(Protocol):
    """One stream's fd as a codec wraps it: `fd` is where the image is written (or read).
    `finish` when the stream is complete (raises what `ERRORS` holds if the codec failed);
    `settle` after the writer or reader failed, to learn whether the codec failed first; `failure`
    why it failed, if it did; `killed` whether a signal ended it; `stop` on any end; `cpu` the
    CPU seconds of its process, once reaped (None: it has none, or not yet reaped)."""

    fd: int | None
    cpu: float | None

    @property
    def pid(self) -> int | None: ...
    @property
    def killed(self) -> bool: ...
    def finish(self) -> None: ...
    def settle(self, timeout: float = ...) -> str | None: ...
    def failure(self) -> str | None: ...
    def stop(self) -> None: ...


class Passthrough:
    """The fd itself: nothing between the image and the connection or the file."""

    def __init__(self, fd: int) -> None:
        self.fd: int | None = fd

    pid = None
    killed = False
    cpu = None

    def finish(self) -> None:
        pass

    def settle(self, timeout: float = 0.0) -> str | None:
        return None

    def failure(self) -> str | None:
        return None

    def stop(self) -> None:
        pass


@dataclass(frozen=True)
class Codec:
    """A method that leaves the streams as they are (`none`, and `xenguest`, whose
    compression happens inside xenguest's records)."""

    name: str
    compresses: bool = False                       # what `compress=true` may choose
    cookie: tuple[str, str] | None = None          # sent on every connection; its presence decides
    emu_args: tuple[str, ...] = ()                 # added to emu-manager's command line (after -dm)
    magic: bytes | None = None                     # how a suspend file it wrote starts
    # In-band compression while it runs: whether xenguest's records may be switched (vm-compress),
    # the mode the policy asks of xenguest at the start, and whether it watches pre-copy converge.
    switchable: bool = True
    in_band_start: str | None = None
    converge_watch: bool = False

    def sender(self, far_fd: int) -> Wrap:
        """Wrap the fd that the image goes out on (a socket or a file)."""
        return Passthrough(far_fd)

    def receiver(self, far_fd: int, relay_from: socket.socket | None = None) -> Wrap:
        """Wrap the fd that the image comes in on; `relay_from`: it is that socket's."""
        return Passthrough(far_fd)


@dataclass(frozen=True)
class ZstdCodec(Codec):
    """The whole stream through an external zstd (zstdpipe), one per stream fd."""

    def sender(self, far_fd: int) -> Wrap:
        return Zstd(compress=True, far_fd=far_fd)

    def receiver(self, far_fd: int, relay_from: socket.socket | None = None) -> Wrap:
        return Zstd(compress=False, far_fd=far_fd, relay_from=relay_from)


NONE = Codec("none")
STREAM = ZstdCodec("stream", compresses=True, cookie=(transport.COOKIE_COMPRESS, transport.COMPRESS_ZSTD),
                   magic=ZSTD_MAGIC, switchable=False)
XENGUEST = Codec("xenguest", compresses=True, emu_args=("-compress", "true"))
# xenguest decides per batch (auto); the toolstack forces compression on when pre-copy stalls.
ADAPTIVE = Codec("adaptive", compresses=True, emu_args=("-compress", "true"), in_band_start="auto",
                 converge_watch=True)

CODECS: dict[str, Codec] = {c.name: c for c in (NONE, STREAM, XENGUEST, ADAPTIVE)}
DEFAULT = STREAM                       # what `compress=true` means when xenopsd.conf says nothing
COMPRESSORS = tuple(name for name, c in CODECS.items() if c.compresses)
ERRORS: tuple[type[Exception], ...] = (CodecError, ZstdError)    # what a codec's wrap raises


def from_cookies(cookies: dict[str, str]) -> Codec:
    """The method of an incoming migration: the codec whose cookie is present (its presence,
    as xenopsd reads it), else the streams are passed through."""
    return next((c for c in CODECS.values() if c.cookie and c.cookie[0] in cookies), NONE)


def from_head(head: bytes) -> Codec:
    """The method of a suspend file from its first bytes: the codec whose magic starts it, else
    the file is read as it is."""
    return next((c for c in CODECS.values() if c.magic and head.startswith(c.magic)), NONE)


MAGIC_SIZE = max(len(c.magic) for c in CODECS.values() if c.magic)
