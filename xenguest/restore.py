"""Restore: read a libxc stream into a domain, checking every rule on the way.

Nothing is trusted: lengths are bounded before a buffer is sized, pfns are
checked against the domain, and completion is reported only after END and
the context records have been applied.
"""
from __future__ import annotations

import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import numpy as np

from xenemu import Domain
from xenemu.context import HVM_PARAM_CONSOLE_PFN, HVM_PARAM_STORE_PFN, hvm_param
from xenemu.memory import PAGE_SIZE

from xenmig import compressed, libxc, libxcwalk
from xenmig.fdio import Reader, Truncated


@dataclass
class RestoreResult:
    store_mfn: int
    console_mfn: int
    pages: int
    records: int
    bytes_read: int


# What compressed records queued for inflation may hold at once (each its body's copy and up to
# 8 MiB of inflated frames), whatever the CPU count: 16 MiB records must not multiply by it.
MAX_INFLIGHT_BYTES = 64 << 20
INFLATED_BYTES = 2 * PAGE_SIZE * libxc.PAGE_DATA_MAX_PFNS


class Restorer:
    def __init__(self, domain: Domain, fd: int, *, on_pages: Callable[[int], None] = lambda n: None) -> None:
        self.domain = domain
        self.mem = domain.memory
        self.reader = Reader(fd)
        self.on_pages = on_pages
        self.pages = 0
        self.threads = int(os.environ.get("XENGUEST_DECOMPRESS_THREADS", 0)) or os.cpu_count() or 1
        self._pool: ThreadPoolExecutor | None = None
        self._pending: deque[tuple[Future[tuple[np.ndarray, np.ndarray]], int]] = deque()
        self._inflight = 0

    def write_pages(self, pfns: np.ndarray, frames: np.ndarray) -> None:
        if pfns.size:
            keep = last_copies(pfns)
            self.mem.pages[pfns[keep]] = frames[keep]
        self.pages += len(pfns)
        self.on_pages(self.pages)

    def _page_record(self, rtype: int, body: memoryview) -> None:
        """Compressed records inflate on a thread pool (zstd releases the GIL); every record's
        pages are written in stream order, so a later copy of a pfn always wins."""
        if rtype == libxc.REC_TYPE_PAGE_DATA or self.threads <= 1:
            self._drain(0)
            decode = plain_frames if rtype == libxc.REC_TYPE_PAGE_DATA else compressed.decode_frames
            self.write_pages(*decode(body, self.mem.npages))
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="inflate")
        # The read buffer is reused for the next record: the job gets its own copy.
        cost = len(body) + INFLATED_BYTES
        self._pending.append((self._pool.submit(compressed.decode_frames, bytes(body), self.mem.npages), cost))
        self._inflight += cost
        self._drain(2 * self.threads)

    def _drain(self, keep: int) -> None:
        while len(self._pending) > keep or self._inflight > MAX_INFLIGHT_BYTES:
            job, cost = self._pending.popleft()
            self._inflight -= cost
            self.write_pages(*job.result())

    def run(self) -> RestoreResult:
        try:
            return self._run()
        except Truncated as e:
            raise libxc.StreamError(str(e)) from None
        finally:
            if self._pool is not None:
                for job, _ in self._pending:
                    job.cancel()
                self._pool.shutdown(wait=True)

    def _run(self) -> RestoreResult:
        """The walk checks every record's rules; page records (recognised by type alone, whatever
        this xenguest was started with) go to the domain, context records to its context."""
        blobs: dict[str, bytes] = {}
        records = 0
        for part in libxcwalk.walk(self.reader, finish=lambda: self._drain(0)):
            if not isinstance(part, libxcwalk.Record):
                continue
            records += 1
            if part.rtype in libxcwalk.PAGE_RECORDS:
                self._page_record(part.rtype, part.body)
            elif part.blob is not None:
                blobs[libxcwalk.CONTEXT[part.rtype]] = part.blob
        self.domain.set_context(blobs)
        params = blobs["hvm_params"]
        return RestoreResult(hvm_param(params, HVM_PARAM_STORE_PFN), hvm_param(params, HVM_PARAM_CONSOLE_PFN),
                             self.pages, records, self.reader.offset)


def last_copies(pfns: np.ndarray) -> np.ndarray | slice:
    """Which entries to write so that a pfn repeated within a record ends with its last copy
    (stream order, as libxc applies them; numpy's fancy assignment promises no order)."""
    reverse_first = np.unique(pfns[::-1], return_index=True)[1]
    if reverse_first.size == pfns.size:
        return slice(None)
    return pfns.size - 1 - reverse_first


def plain_frames(body: memoryview | bytes, npages: int) -> tuple[np.ndarray, np.ndarray]:
    """A PAGE_DATA record's pfns and frames (views of the body: no copy)."""
    pd = libxc.parse_page_data(body, npages)
    return pd.pfns, np.frombuffer(body, dtype=np.uint8, offset=pd.data_offset).reshape(-1, PAGE_SIZE)
