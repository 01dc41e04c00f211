"""`xenguest -mode convert`: a saved stream rewritten in the upstream format, for Xen's own tools.

Each COMPRESSED_PAGE_DATA record becomes one PAGE_DATA record with the same
pfn entries in the same order (a zero page becomes 4096 zero bytes), which
fits: both carry at most 1024 pfns. Each DELTA_PAGE_DATA record becomes one
PAGE_DATA record of its pages with the deltas applied: to resolve them,
convert keeps the last page the stream sent for each pfn (bounded by the
stream's own pfns), and `-base FILE` (a raw memory image, page i at offset
4096 x i) supplies the bases the stream lacks. Everything else, suspend-image
framing included, is copied byte for byte; a zstd-compressed input is written
decompressed. On an invalid input the output stops where the error was found.
"""
from __future__ import annotations

import os

import numpy as np

from xenemu.memory import PAGE_SIZE

from xenmig import compressed, delta, libxc
from xenmig.fdio import Buffer, write_all

from .inspect import Record, Start, walk


def page_data(entries: np.ndarray, frames: np.ndarray) -> list[Buffer | np.ndarray]:
    """The PAGE_DATA record of `entries` and their data pages, as buffers for writev."""
    length = libxc.PAGE_DATA_SIZE + 8 * len(entries) + PAGE_SIZE * len(frames)   # a multiple of 8
    return [libxc.record_header(libxc.REC_TYPE_PAGE_DATA, length), libxc.page_data_header(entries), frames]


ZERO_ROW = -1       # a pfn last sent as a zero page: no bytes kept


class PageStore:
    """The last page the stream sent for each pfn it sent (rows of one array that doubles as
    it fills; zero pages only marked), and the base image for the others, if given."""

    def __init__(self, base: str | None) -> None:
        self.rows: dict[int, int] = {}
        self.pages = np.empty((0, PAGE_SIZE), dtype=np.uint8)
        self.used = 0
        self.base_fd = os.open(base, os.O_RDONLY) if base is not None else None

    def close(self) -> None:
        if self.base_fd is not None:
            os.close(self.base_fd)

    def put(self, pfns: np.ndarray, frames: np.ndarray) -> None:
        zero = np.bitwise_or.reduce(frames.view("<u8"), axis=1) == 0
        for pfn, frame, is_zero in zip(pfns.tolist(), frames, zero.tolist()):
            row = self.rows.get(pfn, ZERO_ROW)
            if is_zero:
                if row == ZERO_ROW:
                    self.rows[pfn] = ZERO_ROW
                else:
                    self.pages[row] = 0         # its row stays its own
                continue
            if row == ZERO_ROW:
                row = self.rows[pfn] = self.used
                self.used += 1
                if row == len(self.pages):
                    grown = np.empty((max(64, 2 * len(self.pages)), PAGE_SIZE), dtype=np.uint8)
                    grown[:len(self.pages)] = self.pages
                    self.pages = grown
            self.pages[row] = frame

    def get(self, pfns: np.ndarray) -> np.ndarray:
        bases = np.empty((len(pfns), PAGE_SIZE), dtype=np.uint8)
        for i, pfn in enumerate(pfns.tolist()):
            row = self.rows.get(pfn)
            if row is not None:
                bases[i] = 0 if row == ZERO_ROW else self.pages[row]
                continue
            if self.base_fd is None:
                raise libxc.StreamError(f"delta for pfn {pfn} needs its base: give -base")
            got = os.pread(self.base_fd, PAGE_SIZE, PAGE_SIZE * pfn)
            if len(got) != PAGE_SIZE:
                raise libxc.StreamError(f"delta for pfn {pfn} needs its base: the -base image ends before it")
            bases[i] = np.frombuffer(got, dtype=np.uint8)
        return bases


def run(infd: int, outfd: int, base: str | None = None) -> int:
    store = PageStore(base)
    try:
        for part in walk(infd):
            if isinstance(part, Start):
                continue
            pages = part.pages if isinstance(part, Record) else None
            if pages is None or pages.pfns is None:
                write_all(outfd, [part.raw])
                continue
            if pages.delta is not None:
                frames = delta.apply(pages.delta, store.get(pages.pfns))
            else:
                frames = pages.frames()
            store.put(pages.pfns, frames)
            if part.rtype == libxc.REC_TYPE_PAGE_DATA:
                write_all(outfd, [part.raw])
            else:
                assert part.rtype in (compressed.REC_TYPE, delta.REC_TYPE)
                write_all(outfd, page_data(pages.entries, frames))
    finally:
        store.close()
    return 0
