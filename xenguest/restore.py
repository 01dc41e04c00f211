"""Restore: read a libxc stream into a domain, checking every rule on the way.

Nothing is trusted: lengths are bounded before a buffer is sized, pfns are
checked against the domain, and completion is reported only after END and
the context records have been applied.
"""
from __future__ import annotations

import os
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import numpy as np

from xenemu import Domain
from xenemu.context import HVM_PARAM_CONSOLE_PFN, HVM_PARAM_STORE_PFN, hvm_param
from xenemu.memory import PAGE_SIZE

from xenmig import compressed, delta, libxc, libxcwalk
from xenmig.fdio import Reader, Truncated


@dataclass
class RestoreResult:
    store_mfn: int
    console_mfn: int
    pages: int
    records: int
    bytes_read: int


# What compressed records queued for inflation may hold at once (each its own read buffer and a
# share of the inflate threads' scratch), whatever the CPU count: 16 MiB records must not multiply by it.
MAX_INFLIGHT_BYTES = 64 << 20
SCRATCH_BYTES = PAGE_SIZE * libxc.PAGE_DATA_MAX_PFNS
# Read buffers kept for reuse are this size: a record of 1024 pages and its metadata. A longer
# record (only a hostile or odd sender writes one) gets a buffer of its own, freed after it.
POOLED_BUFFER_BYTES = libxc.RH_SIZE + libxc.PAGE_DATA_SIZE + (8 + PAGE_SIZE) * libxc.PAGE_DATA_MAX_PFNS + 8

_scratch = threading.local()
# Set in the environment, these record types are refused as a xenguest from before them refuses them
# (one that refuses COMPRESSED_PAGE_DATA is older than DELTA_PAGE_DATA too).
REFUSED_BY = {compressed.REC_TYPE: (compressed.REFUSE_ENV,), delta.REC_TYPE: (compressed.REFUSE_ENV, delta.REFUSE_ENV)}


class ReadBuffers:
    """A small pool of read buffers, so that a record queued for inflation keeps its own bytes
    while the walk reads the next ones (no copy of the record). Main thread only."""

    def __init__(self) -> None:
        self.free: list[bytearray] = []
        self.current: bytearray | None = None      # the buffer of the record being walked

    def take(self, size: int) -> memoryview:
        if self.current is not None:                # the last record was applied, not queued
            self.give_back(self.current)
        if size <= POOLED_BUFFER_BYTES:
            self.current = self.free.pop() if self.free else bytearray(POOLED_BUFFER_BYTES)
        else:
            self.current = bytearray(size)
        return memoryview(self.current)

    def keep(self) -> bytearray:
        """The current record's buffer now belongs to its queued job."""
        buf, self.current = self.current, None
        assert buf is not None
        return buf

    def give_back(self, buf: bytearray) -> None:
        if len(buf) == POOLED_BUFFER_BYTES:
            self.free.append(buf)


class Restorer:
    def __init__(self, domain: Domain, fd: int, *, on_pages: Callable[[int], None] = lambda n: None) -> None:
        self.domain = domain
        self.mem = domain.memory
        self.reader = Reader(fd)
        self.on_pages = on_pages
        self.pages = 0
        self.threads = int(os.environ.get("XENGUEST_DECOMPRESS_THREADS", 0)) or os.cpu_count() or 1
        self._pool: ThreadPoolExecutor | None = None
        self._pending: deque[tuple[Future[None], int, np.ndarray, bytearray]] = deque()
        self._inflight = 0
        self._buffers = ReadBuffers()
        # A building domain's memory is as create_domain left it: all zero. A page is written only
        # if it carries data or was given data earlier in this restore (a later iteration may zero it).
        self._nonzero = np.zeros(self.mem.npages, dtype=bool)
        # pfns a queued record will write: a record touching one waits for them (stream order wins).
        self._queued = np.zeros(self.mem.npages, dtype=bool)
        # pfns this stream has sent: a delta's base is only what the stream sent before.
        self._sent = np.zeros(self.mem.npages, dtype=bool)

    def _to_zero(self, zero_pfns: np.ndarray) -> np.ndarray:
        """Of pages that arrive as zeros, those that must be written (given data earlier)."""
        written = zero_pfns[self._nonzero[zero_pfns]]
        self._nonzero[written] = False
        return written

    def _count(self, n: int) -> None:
        self.pages += n
        self.on_pages(self.pages)

    def write_pages(self, pfns: np.ndarray, frames: np.ndarray) -> None:
        """Frames from the read buffer to guest memory, skipping zero pages the domain still has."""
        count = len(pfns)
        if pfns.size:
            keep = last_copies(pfns)
            pfns, frames = pfns[keep], frames[keep]
            zero = np.bitwise_or.reduce(frames.view("<u8"), axis=1) == 0
            self.mem.pages[self._to_zero(pfns[zero])] = 0
            data = np.flatnonzero(~zero)
            self._nonzero[pfns[data]] = True
            self._write_runs(pfns[data], frames, data)
        self._count(count)

    def _write_runs(self, pfns: np.ndarray, frames: np.ndarray, rows: np.ndarray) -> None:
        """frames[rows] into guest memory at `pfns`, by runs of consecutive pfns in consecutive rows
        (GuestMemory.write_run), even a scattered record's: through the mapping, the first touch of
        a fresh page costs the kernel a zero-fill, and zero pages left out split most records' runs."""
        if not pfns.size:
            return
        breaks = np.flatnonzero((np.diff(pfns.astype(np.int64)) != 1) | (np.diff(rows) != 1)) + 1
        for start, end in zip((0, *breaks.tolist()), (*breaks.tolist(), len(pfns))):
            self.mem.write_run(int(pfns[start]), frames[int(rows[start]):int(rows[end - 1]) + 1])

    def _inflate(self, payload: memoryview, data_pfns: np.ndarray, zero_pfns: np.ndarray) -> None:
        """One compressed record into guest memory (on an inflate thread, or inline), through
        one reused scratch buffer per thread."""
        if data_pfns.size:
            frames = _thread_scratch("frames")[:data_pfns.size]
            compressed.inflate_into(payload, [memoryview(frames).cast("B")])
            self._write_runs(data_pfns, frames, np.arange(data_pfns.size))
        if zero_pfns.size:
            self.mem.pages[zero_pfns] = 0

    def _apply_delta(self, record: delta.DeltaRecord) -> None:
        """One delta record into guest memory (on an inflate thread, or inline): its bases
        gathered into one reused scratch, the deltas inflated into another and XORed in place."""
        bases = _thread_scratch("bases")[:record.pfns.size]
        np.take(self.mem.pages, record.pfns.astype(np.intp), axis=0, out=bases)
        results = delta.apply_into(record, bases, _thread_scratch("frames"))
        self._write_runs(record.pfns, results, np.arange(record.pfns.size))

    def _page_record(self, rtype: int, body: memoryview) -> None:
        """Page records are applied in stream order where they overlap: a record that touches a
        pfn a queued one will write waits for it, so a later copy of a pfn always wins. Compressed
        records inflate on a thread pool (zstd releases the GIL), straight into guest memory."""
        if rtype == delta.REC_TYPE:
            self._delta_record(body)
            return
        try:
            if rtype == libxc.REC_TYPE_PAGE_DATA:
                pfns, frames = plain_frames(body, self.mem.npages)
            else:
                pfns, zero, payload = compressed.parse(body, self.mem.npages)
        except libxc.StreamError:
            self._drain(0)          # an earlier record's error comes first
            raise
        self._sent[pfns] = True
        if self._queued[pfns].any():
            self._drain(0)
        if rtype == libxc.REC_TYPE_PAGE_DATA:
            self.write_pages(pfns, frames)
            return
        if not isinstance(last_copies(pfns), slice):    # a pfn twice in one record: the staged way
            self._drain(0)
            self.write_pages(*compressed.decode_frames(body, self.mem.npages))
            return
        data_pfns, zero_pfns = pfns[~zero], self._to_zero(pfns[zero])
        self._nonzero[data_pfns] = True
        if self.threads <= 1:
            self._inflate(payload, data_pfns, zero_pfns)
            self._count(len(pfns))
            return
        self._submit(self._inflate, (payload, data_pfns, zero_pfns), pfns, SCRATCH_BYTES)

    def _delta_record(self, body: memoryview) -> None:
        """A delta applies to the page the domain holds (what the stream sent for it last), once
        the queued records that write those pfns are done; on the inflate pool like a compressed
        record (bases, crcs, zstd and XOR release the GIL), in stream order where pfns overlap."""
        try:
            record = delta.parse(body, self.mem.npages)
            never = np.flatnonzero(~self._sent[record.pfns])
            if never.size:
                raise libxc.StreamError(f"DELTA_PAGE_DATA for pfn 0x{int(record.pfns[never[0]]):x}, "
                                        f"which this stream never sent (no base)")
        except libxc.StreamError:
            self._drain(0)          # an earlier record's error comes first
            raise
        if self._queued[record.pfns].any():
            self._drain(0)
        self._nonzero[record.pfns] = True
        if self.threads <= 1:
            self._apply_delta(record)
            self._count(record.pfns.size)
            return
        self._submit(self._apply_delta, (record,), record.pfns, 2 * SCRATCH_BYTES)

    def _submit(self, job: Callable, args: tuple, pfns: np.ndarray, scratch: int) -> None:
        """Queue a record's job on the inflate pool; its read buffer goes with it."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="inflate")
        buf = self._buffers.keep()
        cost = len(buf) + scratch
        self._queued[pfns] = True
        self._pending.append((self._pool.submit(job, *args), cost, pfns, buf))
        self._inflight += cost
        self._drain(2 * self.threads)

    def _drain(self, keep: int) -> None:
        while len(self._pending) > keep or self._inflight > MAX_INFLIGHT_BYTES:
            job, cost, pfns, buf = self._pending.popleft()
            self._inflight -= cost
            job.result()
            self._queued[pfns] = False
            self._buffers.give_back(buf)
            self._count(len(pfns))

    def run(self) -> RestoreResult:
        try:
            return self._run()
        except Truncated as e:
            raise libxc.StreamError(str(e)) from None
        finally:
            if self._pool is not None:
                for job, *_ in self._pending:
                    job.cancel()
                self._pool.shutdown(wait=True)

    def _run(self) -> RestoreResult:
        """The walk checks every record's rules; page records (recognised by type alone, whatever
        this xenguest was started with) go to the domain, context records to its context."""
        blobs: dict[str, bytes] = {}
        records = 0
        for part in libxcwalk.walk(self.reader, finish=lambda: self._drain(0), buffer=self._buffers.take):
            if not isinstance(part, libxcwalk.Record):
                continue
            records += 1
            if any(os.environ.get(env) for env in REFUSED_BY.get(part.rtype, ())):   # an older xenguest
                raise libxc.StreamError(f"unknown mandatory record type 0x{part.rtype:08x} at offset {part.offset}")
            if part.rtype in libxcwalk.PAGE_RECORDS:
                self._page_record(part.rtype, part.body)
            elif part.blob is not None:
                blobs[libxcwalk.CONTEXT[part.rtype]] = part.blob
        self.domain.set_context(blobs)
        params = blobs["hvm_params"]
        return RestoreResult(hvm_param(params, HVM_PARAM_STORE_PFN), hvm_param(params, HVM_PARAM_CONSOLE_PFN),
                             self.pages, records, self.reader.offset)


def _thread_scratch(name: str) -> np.ndarray:
    """This thread's reused buffer `name` of one record's frames (allocated on first use)."""
    buf = getattr(_scratch, name, None)
    if buf is None:
        buf = np.empty((libxc.PAGE_DATA_MAX_PFNS, PAGE_SIZE), dtype=np.uint8)
        setattr(_scratch, name, buf)
    return buf


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
