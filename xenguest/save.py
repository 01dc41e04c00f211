"""Save: write a domain's memory and context as a libxc stream, live or not.

Live save follows libxc's pre-copy loop (xg_sr_save.c, send_memory_live):
the precopy policy is asked before each pass with libxc's statistics
(iteration 0 with every pfn dirty and nothing written, then after each pass
once with the dirty count unknown, -1, and once with the fresh count); a
pass decided on is still sent, then the loop stops. Whoever supplies the
policy decides when: under emu-manager, emu-manager does (xenguest stops
when told to pause); standalone, libxc's own simple policy. Then the domain
is paused (by whoever `suspend` calls on) and the final pass sends what is
still dirty, followed by TSC info, HVM params, HVM context and END (the
upstream spec's order).
"""
from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field, replace
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable

import numpy as np

from xenemu import Domain
from xenmig import libxc
from xenmig.emp import MODE_OFF
from xenmig.fdio import write_all
from xenmig.libxc import Encoded
from xenmig.precopy import Aborted, PrecopyPolicy, PrecopyStats

from .adaptive import AdaptivePages

# The page records: one encoder whatever the mode (xenguest's `-compress true` starts it in `on`,
# the toolstack's `xenguest` method; a switch may change it mid-save); the restorer reads either
# record by its type.


# libxc's built-in policy when its caller gives none (xg_sr_save.c, simple_precopy_policy): fewer
# than 50 dirty pages, or 5 passes done. Standalone `xenguest -mode save` uses it; tests and
# experiments tune the pass limit with XENGUEST_MAX_ITERATIONS.
SPP_MAX_ITERATIONS = 5
SPP_TARGET_DIRTY_COUNT = 50


def simple_precopy_policy(max_iterations: int | None = None) -> PrecopyPolicy:
    limit = max_iterations if max_iterations is not None else int(
        os.environ.get("XENGUEST_MAX_ITERATIONS", SPP_MAX_ITERATIONS))

    def policy(stats: PrecopyStats) -> bool:
        return 0 <= stats.dirty_count < SPP_TARGET_DIRTY_COUNT or stats.iteration >= limit
    return policy


@dataclass
class Progress:
    sent: int = 0               # pages sent so far
    iteration: int = 0          # libxc's count when pre-copy stopped
    wire_bytes: int = 0
    zero_pages: int = 0         # pages sent as a zero marker, without data
    history: list[int] = field(default_factory=list)   # pages sent per iteration

    def stats(self) -> dict[str, int]:
        """The figures xenguest reports to emu-manager at the end of a save (emp.save_stats_event),
        which forwards them to the toolstack."""
        return {"iterations": len(self.history), "pages": self.sent, "zero_pages": self.zero_pages,
                "bytes": self.wire_bytes}

    def summary(self, domid: int) -> str:
        """The one line xenguest logs at the end of a save, for people (the toolstack has the
        figures from the statistics message)."""
        return (f"saved domain {domid}: iterations {len(self.history)}, pages {self.sent}, "
                f"zero pages {self.zero_pages}, bytes {self.wire_bytes}, per iteration {self.history}")


def frames(pages: np.ndarray, batch: np.ndarray) -> np.ndarray:
    """The batch's page frames: a view of guest memory when the pfns are contiguous
    (iteration 0), so they go to writev or the encoder without a gather copy."""
    first, last = int(batch[0]), int(batch[-1])
    if last - first + 1 == len(batch):
        return pages[first:last + 1]
    return pages[batch]


class Saver:
    def __init__(self, domain: Domain, fd: int, *, live: bool, policy: PrecopyPolicy,
                 suspend: Callable[[], None], on_pass_progress: Callable[[int, int], None] = lambda done, total: None,
                 encoder: AdaptivePages | None = None, abort: threading.Event | None = None,
                 on_iteration: Callable[[dict], None] = lambda figures: None) -> None:
        """`on_pass_progress(done, total)` runs at the start of each pass and after each batch
        (libxc's progress callback); `abort` may be shared with whoever receives that request;
        `on_iteration(figures)` after each pass, with its XENMIG_ITERATION fields."""
        self.domain = domain
        self.mem = domain.memory
        self.fd = fd
        self.live = live
        self.policy = policy
        self.suspend = suspend
        self.on_pass_progress = on_pass_progress
        self.encoder = encoder or AdaptivePages(MODE_OFF)
        self.on_iteration = on_iteration
        self.progress = Progress()
        self._pool: ThreadPoolExecutor | None = None
        self.abort = abort or threading.Event()
        self._pass_start = self._pass_total = 0

    def _write(self, buffers: list) -> None:
        if self.abort.is_set():
            raise Aborted("save aborted")
        start = time.monotonic()
        nbytes = write_all(self.fd, buffers)
        self.encoder.wrote(nbytes, time.monotonic() - start)
        self.progress.wire_bytes += nbytes

    def _record(self, rtype: int, body: bytes = b"") -> None:
        self._write([libxc.build_record(rtype, body)])

    def _encode(self, batch: np.ndarray) -> Encoded:
        return self.encoder.encode(batch, frames(self.mem.pages, batch))

    def _emit(self, batch: np.ndarray, encoded: Encoded) -> None:
        encoded = self.encoder.reconsider(batch, lambda: frames(self.mem.pages, batch), encoded)
        self._write(encoded.buffers)
        self.progress.sent += len(batch)
        self.progress.zero_pages += encoded.zero_pages
        self.on_pass_progress(self.progress.sent - self._pass_start, self._pass_total)

    def send_pages(self, pfns: np.ndarray) -> None:
        """Batches of at most 1024 pfns, written in order. An encoder that can, encodes
        several batches at once on a thread pool (zstd releases the GIL) while this thread
        writes: compression and transfer overlap, and use every core."""
        batches = [pfns[i:i + libxc.PAGE_DATA_MAX_PFNS] for i in range(0, len(pfns), libxc.PAGE_DATA_MAX_PFNS)]
        if self.encoder.threads <= 1:
            for batch in batches:
                self._emit(batch, self._encode(batch))
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.encoder.threads, thread_name_prefix="encode")
        window: deque[tuple[np.ndarray, Future[Encoded]]] = deque()
        try:
            for batch in batches:
                window.append((batch, self._pool.submit(self._encode, batch)))
                if len(window) > 2 * self.encoder.threads:
                    done, future = window.popleft()
                    self._emit(done, future.result())
            while window:
                done, future = window.popleft()
                self._emit(done, future.result())
        finally:
            for _, future in window:
                future.cancel()

    def _pass(self, pfns: np.ndarray) -> None:
        self._pass_start, self._pass_total = self.progress.sent, len(pfns)
        wire_start = self.progress.wire_bytes
        self.encoder.end_pass()             # the records before the first pass are not its figures
        self.encoder.start_pass(len(self.progress.history), self.mem.npages)
        self.on_pass_progress(0, len(pfns))
        self.send_pages(pfns)
        self.on_iteration({"iteration": len(self.progress.history), "pages": len(pfns),
                           "dirty": self.mem.dirty_count(), "wire_bytes": self.progress.wire_bytes - wire_start,
                           **self.encoder.end_pass()})
        self.progress.history.append(len(pfns))

    def run(self) -> Progress:
        try:
            return self._run()
        finally:
            if self._pool is not None:
                self._pool.shutdown(cancel_futures=True)

    def _run(self) -> Progress:
        ctx = self.domain.context()
        self._write([libxc.build_image_header(), libxc.build_domain_header()])
        self._record(libxc.REC_TYPE_X86_CPUID_POLICY, ctx["cpuid_policy"])
        self._record(libxc.REC_TYPE_X86_MSR_POLICY, ctx["msr_policy"])
        self._record(libxc.REC_TYPE_STATIC_DATA_END)
        every_pfn = np.arange(self.mem.npages, dtype=np.uint64)
        if self.live:
            self._precopy(every_pfn)
            self.suspend()
            self._pass(self.mem.peek_and_clean())     # all dirtied since the last pass's clean
        else:
            self.suspend()
            self._pass(every_pfn)
        self._record(libxc.REC_TYPE_X86_TSC_INFO, ctx["tsc_info"])
        # The spec: HVM_PARAMS precede HVM_CONTEXT (params affect the context's validity).
        self._record(libxc.REC_TYPE_HVM_PARAMS, libxc.build_hvm_params(ctx["hvm_params"]))
        self._record(libxc.REC_TYPE_HVM_CONTEXT, ctx["hvm_context"])
        self._record(libxc.REC_TYPE_END)
        return self.progress

    def _precopy(self, every_pfn: np.ndarray) -> None:
        """Passes while the guest runs, in libxc's order of policy calls and statistics."""
        self.mem.clean_all()
        pending = every_pfn
        stats = PrecopyStats(iteration=0, total_written=0, dirty_count=len(every_pfn))
        while True:
            stop = self.policy(stats)
            if len(pending):
                self._pass(pending)
            if stop:
                break
            stats = PrecopyStats(stats.iteration + 1, stats.total_written + len(pending), -1)
            if self.policy(stats):
                break
            pending = self.mem.peek_and_clean()
            stats = replace(stats, dirty_count=len(pending))
        self.progress.iteration = stats.iteration
