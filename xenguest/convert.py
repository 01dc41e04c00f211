"""`xenguest -mode convert`: a saved stream rewritten in the upstream format, for Xen's own tools.

Each COMPRESSED_PAGE_DATA record becomes one PAGE_DATA record with the same
pfn entries in the same order (a zero page becomes 4096 zero bytes), which
fits: both carry at most 1024 pfns. Everything else, suspend-image framing
included, is copied byte for byte; a zstd-compressed input is written
decompressed. One record is held at a time. On an invalid input the output
stops where the error was found.
"""
from __future__ import annotations

import numpy as np

from xenemu.memory import PAGE_SIZE

from xenmig import compressed, libxc
from xenmig.fdio import Buffer, write_all

from .inspect import Pages, Record, Start, walk


def page_data(pages: Pages) -> list[Buffer | np.ndarray]:
    """The PAGE_DATA record equivalent to a compressed one, as buffers for writev."""
    frames = np.zeros((pages.data, PAGE_SIZE), dtype=np.uint8)
    frames[~pages.zero] = np.frombuffer(pages.inflated, dtype=np.uint8).reshape(-1, PAGE_SIZE)
    length = libxc.PAGE_DATA_SIZE + 8 * len(pages.entries) + PAGE_SIZE * pages.data   # a multiple of 8
    return [libxc.record_header(libxc.REC_TYPE_PAGE_DATA, length), libxc.page_data_header(pages.entries), frames]


def run(infd: int, outfd: int) -> int:
    for part in walk(infd):
        if isinstance(part, Start):
            continue
        if isinstance(part, Record) and part.rtype == compressed.REC_TYPE:
            assert part.pages is not None
            write_all(outfd, page_data(part.pages))
        else:
            write_all(outfd, [part.raw])
    return 0
