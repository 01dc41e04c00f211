"""Whole reads and writes on raw fds (pipes and sockets return short counts)."""
from __future__ import annotations

import os
from typing import Sequence

Buffer = bytes | bytearray | memoryview


class Truncated(EOFError):
    """The peer closed the fd before a whole item arrived."""


class Stalled(OSError):
    """The fd's timeout (the toolstack sets SO_SNDTIMEO/SO_RCVTIMEO on a migration socket)
    expired: the peer stopped moving bytes."""


def write_all(fd: int, buffers: Sequence[Buffer]) -> int:
    """writev until every buffer is out; no joining copy of the payload."""
    views = [memoryview(b).cast("B") for b in buffers if len(b)]
    total = sum(len(v) for v in views)
    while views:
        try:
            n = os.writev(fd, views[:1024])
        except (BlockingIOError, TimeoutError):
            raise Stalled("stream stalled: the peer took no data within the socket's timeout") from None
        except OSError as e:
            raise OSError(f"stream write failed: {e.strerror or e}") from None
        while n:
            if n >= len(views[0]):
                n -= len(views[0])
                views.pop(0)
            else:
                views[0] = views[0][n:]
                n = 0
    return total


class Reader:
    """Exact reads from an fd with a running offset, for error messages."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.offset = 0

    def readinto(self, view: memoryview, what: str) -> None:
        got = 0
        size = len(view)
        while got < size:
            try:
                n = os.readv(self.fd, [view[got:]])
            except (BlockingIOError, TimeoutError):
                raise Stalled(f"stream stalled in {what} at offset {self.offset + got}: "
                              "nothing arrived within the socket's timeout") from None
            except OSError as e:
                raise OSError(f"stream read failed in {what} at offset {self.offset + got}: "
                              f"{e.strerror or e}") from None
            if n == 0:
                raise Truncated(f"stream truncated in {what} at offset {self.offset + got}: "
                                f"{got} of {size} bytes")
            got += n
        self.offset += size

    def read(self, size: int, what: str) -> bytes:
        buf = bytearray(size)
        self.readinto(memoryview(buf), what)
        return bytes(buf)
