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

from xenmig import compressed, libxc
from xenmig.fdio import Reader, Truncated

# Records that must arrive before END, with the context blob each one fills.
CONTEXT_RECORDS = {
    libxc.REC_TYPE_X86_CPUID_POLICY: "cpuid_policy",
    libxc.REC_TYPE_X86_MSR_POLICY: "msr_policy",
    libxc.REC_TYPE_X86_TSC_INFO: "tsc_info",
    libxc.REC_TYPE_HVM_CONTEXT: "hvm_context",
    libxc.REC_TYPE_HVM_PARAMS: "hvm_params",
}
REQUIRED_RECORDS = {libxc.REC_TYPE_HVM_CONTEXT, libxc.REC_TYPE_HVM_PARAMS, libxc.REC_TYPE_X86_TSC_INFO}


@dataclass
class RestoreResult:
    store_mfn: int
    console_mfn: int
    pages: int
    records: int
    bytes_read: int


# Page records, recognised by type alone whatever this xenguest was started with.
PAGE_RECORDS = (libxc.REC_TYPE_PAGE_DATA, compressed.REC_TYPE)
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
        self._buf = bytearray(libxc.MAX_RECORD_BODY + 8)
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
        r = self.reader
        version = libxc.parse_image_header(r.read(libxc.IHDR_SIZE, "image header"))
        libxc.parse_domain_header(r.read(libxc.DHDR_SIZE, "domain header"))
        blobs: dict[str, bytes] = {}
        seen: set[int] = set()
        static_done = version < 3
        records = 0
        while True:
            at = r.offset
            rtype, length = libxc.parse_record_header(r.read(libxc.RH_SIZE, "record header"))
            pad = libxc.padding(length)
            view = memoryview(self._buf)[:length + pad]
            r.readinto(view, f"{libxc.record_name(rtype)} record")
            if any(view[length:]):
                raise libxc.StreamError(f"non-zero padding after {libxc.record_name(rtype)} record at offset {at}")
            body = view[:length]
            records += 1
            if rtype == libxc.REC_TYPE_END:
                if length:
                    raise libxc.StreamError("END record with a body")
                self._drain(0)
                break
            if rtype in PAGE_RECORDS:
                if not static_done:
                    raise libxc.StreamError(f"{libxc.record_name(rtype)} before STATIC_DATA_END")
                self._page_record(rtype, body)
            elif rtype == libxc.REC_TYPE_STATIC_DATA_END:
                if length:
                    raise libxc.StreamError("STATIC_DATA_END record with a body")
                static_done = True
            elif rtype in CONTEXT_RECORDS:
                blobs[CONTEXT_RECORDS[rtype]] = context_blob(rtype, body)
            elif rtype in (libxc.REC_TYPE_VERIFY, libxc.REC_TYPE_CHECKPOINT):
                raise libxc.StreamError(f"{libxc.record_name(rtype)} record is not supported on a migration")
            elif not rtype & libxc.REC_TYPE_OPTIONAL:
                raise libxc.StreamError(f"unknown mandatory record type 0x{rtype:08x} at offset {at}")
            seen.add(rtype)
        missing = REQUIRED_RECORDS - seen
        if missing:
            raise libxc.StreamError("stream ended without " + ", ".join(sorted(libxc.record_name(t) for t in missing)))
        self.domain.set_context(blobs)
        params = blobs["hvm_params"]
        return RestoreResult(hvm_param(params, HVM_PARAM_STORE_PFN), hvm_param(params, HVM_PARAM_CONSOLE_PFN),
                             self.pages, records, r.offset)


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


def context_blob(rtype: int, body: memoryview) -> bytes:
    if rtype == libxc.REC_TYPE_X86_TSC_INFO:
        return libxc.check_tsc_info(bytes(body))
    if rtype == libxc.REC_TYPE_HVM_PARAMS:
        return libxc.parse_hvm_params(bytes(body))
    if rtype == libxc.REC_TYPE_X86_CPUID_POLICY:
        return libxc.check_array("X86_CPUID_POLICY", bytes(body), libxc.X86_CPUID_POLICY_ENTRY_SIZE)
    if rtype == libxc.REC_TYPE_X86_MSR_POLICY:
        return libxc.check_array("X86_MSR_POLICY", bytes(body), libxc.X86_MSR_POLICY_ENTRY_SIZE)
    if not len(body):
        raise libxc.StreamError("empty HVM_CONTEXT record")
    return bytes(body)

