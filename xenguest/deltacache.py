"""The saver's bounded cache of what it sent: per pfn, the exact bytes the receiver now holds.

A delta is only as good as its base: an entry is the snapshot the encoder sent for that pfn
(never live guest memory), a pfn last sent as a zero page is marked (its base is zeros, nothing
stored), and any send the cache does not see the bytes of (plain PAGE_DATA from guest memory)
drops the pfn's entry. So the cache always equals what the receiver holds, or does not claim
the pfn.

Bounded: every byte it holds counts against `bound`: the pfn index (4 bytes a pfn), per slot its
pfn, pass stamp and free-list entry (16 bytes), and the 4096-byte page copies of the slots in
use. The slot array is allocated once at most the bound and untouched until used (the kernel
gives it pages as slots fill), so the process grows with what the cache holds.

Eviction (why not FIFO, LRU or CLOCK): pre-copy sends the dirty pfns in pfn order every pass,
so a working set larger than the cache is a loop, and FIFO, LRU and CLOCK then evict each page
just before it comes round again: no hit at all. Here a page earns protection by being sent
again (the guest rewrites it: the working set); a slot's stamp is the last pass that re-sent its
page. The victim for a re-sent page without a slot is the next slot, in clock order, whose stamp
is older than the previous pass (pages sent only in iteration 0 first); when every slot holds a
page re-sent in this or the previous pass, the newcomer is not admitted. A hot set larger than
the cache keeps a fixed part of it cached (hits: cache/hot set per pass, what a loop allows),
and a hot set that moves frees its old slots after one pass. A page sent for the first time only
takes a free slot (no churn in iteration 0, which sends every page once).
"""
from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np

from xenemu.memory import PAGE_SIZE

NEVER = -1          # index: not sent yet in this stream
ZERO = -2           # last sent as a zero page: its base is zeros, nothing stored
UNCACHED = -3       # sent, its bytes not held: the cache does not claim it
PROBATION = -1      # stamp of a page sent once (evictable by any re-sent page)
INDEX_BYTES = 4     # int32 per pfn
SLOT_META_BYTES = 16    # per slot: pfn int64, stamp int32, free-list int32


@dataclass
class Reservation:
    """Slots taken for a batch's data pages (in order), and which of its pfns were sent before."""
    slots: np.ndarray
    resent: np.ndarray


class DeltaCache:
    """Thread-safe (the saver encodes batches on a pool): one lock around the index and slots.
    Batches of one pass hold distinct pfns, and a hit's slot is stamped with the pass at lookup,
    so no other batch of the pass evicts it between lookup and store."""

    def __init__(self, bound: int, npages: int) -> None:
        self.bound = bound
        index_bytes = INDEX_BYTES * npages
        self.enabled = bound >= index_bytes
        nslots = max(0, (bound - index_bytes) // (PAGE_SIZE + SLOT_META_BYTES)) if self.enabled else 0
        self.overhead = index_bytes + SLOT_META_BYTES * nslots if self.enabled else 0
        self.index = np.full(npages if self.enabled else 0, NEVER, dtype=np.int32)
        self.slots = np.empty((nslots, PAGE_SIZE), dtype=np.uint8)     # untouched until used
        self.slot_pfn = np.full(nslots, -1, dtype=np.int64)
        self.stamp = np.full(nslots, PROBATION, dtype=np.int32)
        self.free = np.arange(nslots - 1, -1, -1, dtype=np.int32)      # a stack: slot 0 first
        self.nfree = nslots
        self.hand = 0
        self.iteration = 0
        self.hits = self.misses = 0
        self.peak = self.held()
        self._lock = threading.Lock()

    def held(self) -> int:
        """Bytes the cache holds: its index and slot bookkeeping, and the pages of its used slots."""
        return self.overhead + PAGE_SIZE * (len(self.slots) - self.nfree)

    def start_pass(self, iteration: int) -> None:
        with self._lock:
            self.iteration = iteration
            self.hits = self.misses = 0

    def counters(self) -> dict[str, int]:
        """The pass's XENMIG_ITERATION cache fields."""
        with self._lock:
            return {"cache_hits": self.hits, "cache_misses": self.misses,
                    "cache_bytes": self.held(), "cache_peak_bytes": self.peak}

    def useful(self, pfns: np.ndarray) -> bool:
        """Whether the batch can gain from the cache: a base for a delta (after iteration 0), or a
        slot to take (free, or a victim for a re-sent page). If not, the saver sends it without
        copying it out of guest memory, and `forget`s its pfns (its re-sent pages count as misses)."""
        with self._lock:
            if not self.enabled:
                return False
            if self.nfree:
                return True
            if self.iteration == 0:
                return False
            idx = self.index[pfns]
            if ((idx >= 0) | (idx == ZERO)).any():
                return True
            resent = int((idx != NEVER).sum())
            if resent and (self.stamp < self.iteration - 1).any():
                return True
            self.misses += resent
            return False

    def reserve(self, pfns: np.ndarray, zero: np.ndarray) -> Reservation | None:
        """Free slots for a batch none of whose pfns the cache holds (iteration 0's batches, and
        first sends after it), one per data page (`zero`: the pages going as zero pages), or
        None (some pfn has a base, or too few slots are free: the batch takes the other way).
        Reserved slots are stamped with this pass until `commit`, so no batch evicts them while
        their pages are copied in and encoded outside the lock."""
        with self._lock:
            if not self.enabled:
                return None
            idx = self.index[pfns]
            want = len(pfns) - int(zero.sum())
            if ((idx >= 0) | (idx == ZERO)).any() or want > self.nfree:
                return None
            slots = self.free[self.nfree - want:self.nfree][::-1].copy()
            self.nfree -= want
            self.slot_pfn[slots] = pfns[~zero]
            self.stamp[slots] = self.iteration
            self.misses += int((idx == UNCACHED).sum())
            return Reservation(slots, idx != NEVER)

    def fill(self, reserved: Reservation, pages: np.ndarray, data: np.ndarray) -> np.ndarray:
        """Copy the batch's data pages (`data`: their mask over `pages`, guest memory) into the
        reserved slots, in one read of each, and return them (a view of the slots when they are
        consecutive, as they are while slots are taken in order): the snapshot to encode from."""
        slots = reserved.slots
        if slots.size and int(slots[-1]) - int(slots[0]) + 1 == slots.size:
            rows = self.slots[int(slots[0]):int(slots[-1]) + 1]
            np.compress(data, pages, axis=0, out=rows)
            return rows
        copied = pages[data]
        self.slots[slots] = copied
        return copied

    def commit(self, pfns: np.ndarray, zero: np.ndarray, reserved: Reservation) -> None:
        """The reserved batch went out: its data pages as held in their slots, `zero` as zero pages."""
        with self._lock:
            data = ~zero
            self.index[pfns[zero]] = ZERO
            self.index[pfns[data]] = reserved.slots
            self.stamp[reserved.slots] = np.where(reserved.resent[data], self.iteration, PROBATION)
            self.peak = max(self.peak, self.held())

    def lookup(self, pfns: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(hit mask, bases): which of the batch's pfns have a base the receiver holds, and a copy
        of each, in order (zeros for zero-page bases). Pages sent before without a base held are misses.
        The hits' slots are stamped with this pass, so no other batch evicts them: they are read
        (and, by store, written) outside the lock."""
        with self._lock:
            if not self.enabled:
                return np.zeros(len(pfns), dtype=bool), np.empty((0, PAGE_SIZE), dtype=np.uint8)
            idx = self.index[pfns]
            slotted = idx >= 0
            hit = slotted | (idx == ZERO)
            self.stamp[idx[slotted]] = self.iteration        # re-sent: protected this pass
            self.hits += int(hit.sum())
            self.misses += int((idx == UNCACHED).sum())
        held = slotted[hit]
        if held.all():
            return hit, np.take(self.slots, idx[slotted], axis=0)
        bases = np.zeros((int(hit.sum()), PAGE_SIZE), dtype=np.uint8)
        bases[held] = self.slots[idx[slotted]]
        return hit, bases

    def store(self, pfns: np.ndarray, sent: np.ndarray, zero: np.ndarray) -> None:
        """The batch went out as `sent` (the snapshot the records were encoded from); `zero`:
        the pages that went as zero pages."""
        with self._lock:
            if not self.enabled:
                return
            idx = self.index[pfns]
            before = idx.copy()
            slotted = idx >= 0
            self._release(idx[slotted & zero])
            self.index[pfns[zero]] = ZERO
            keep = slotted & ~zero
            self.stamp[idx[keep]] = self.iteration
            want = np.flatnonzero(~slotted & ~zero)
            if want.size:
                self._admit(pfns[want], sent[want], before[want] != NEVER)
            self.peak = max(self.peak, self.held())
        # the kept slots are this batch's, stamped with this pass above: no batch evicts them
        if keep.all():
            self.slots[idx] = sent
        elif keep.any():
            self.slots[idx[keep]] = sent[keep]

    def forget(self, pfns: np.ndarray) -> None:
        """The pfns went out in bytes the cache did not see: it no longer claims them."""
        with self._lock:
            if not self.enabled:
                return
            idx = self.index[pfns]
            self._release(idx[idx >= 0])
            self.index[pfns] = UNCACHED

    def _release(self, slots: np.ndarray) -> None:
        if not slots.size:
            return
        self.index[self.slot_pfn[slots]] = UNCACHED
        self.slot_pfn[slots] = -1
        self.stamp[slots] = PROBATION
        self.free[self.nfree:self.nfree + slots.size] = slots
        self.nfree += slots.size

    def _admit(self, pfns: np.ndarray, pages: np.ndarray, resent: np.ndarray) -> None:
        """Slots for pages without one: free slots first, then (re-sent pages only) victims."""
        self.index[pfns] = UNCACHED
        take = min(self.nfree, pfns.size)
        slots = self.free[self.nfree - take:self.nfree][::-1].copy()
        self.nfree -= take
        self.slot_pfn[slots] = pfns[:take]           # taken: no longer free, never a victim below
        rest = np.flatnonzero(resent[take:]) + take
        if rest.size and len(self.slots):
            order = (np.arange(len(self.slots)) + self.hand) % len(self.slots)
            evictable = (self.stamp[order] < self.iteration - 1) & (self.slot_pfn[order] >= 0)
            evictable[np.isin(order, slots)] = False
            victims = order[evictable][:rest.size]
            if victims.size:
                self.hand = int(victims[-1] + 1) % len(self.slots)
                self.index[self.slot_pfn[victims]] = UNCACHED
            chosen = np.concatenate([np.arange(take), rest[:victims.size]])
            slots = np.concatenate([slots, victims.astype(np.int32)])
        else:
            chosen = np.arange(take)
        if not chosen.size:
            return
        self.slots[slots] = pages if chosen.size == len(pages) else pages[chosen]
        self.slot_pfn[slots] = pfns[chosen]
        self.stamp[slots] = np.where(resent[chosen], self.iteration, PROBATION)
        self.index[pfns[chosen]] = slots
