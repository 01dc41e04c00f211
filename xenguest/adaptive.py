"""The saver's one page encoder: compression off, on, or decided per batch from measurements.

Each in-band record says by its type whether it is compressed, so the
receiver needs no signal and the choice may change from one batch to the
next: by a switch from emu-manager (xenmig_compress, on the EMP thread), or,
in `auto`, by `compress_wins` from what this save measures as it goes:

- the drain rate of the stream fd, from the wire bytes written and the time
  blocked writing them over the last LINK_WINDOW seconds (LinkMeter);
- the compression rate per thread in wall time (so that CPU taken by other
  migrations or by the receiver shows) and the ratio of recent batches;
- per region of REGION_PFNS pfns, the ratio it reached last time: a region
  that did not shrink is sent plain, and compressed again now and then.

A batch is compressed when that moves guest memory faster: compressed, a
guest byte costs the slower of compressing it (on every thread) and sending
what is left of it; plain, sending it whole.

With a delta cache (`-delta-cache BYTES`, mode on or auto), the pages of a
batch re-sent after iteration 0 whose base the cache holds go as one
DELTA_PAGE_DATA record, the rest as above. In `auto`, per region: the first
visit and every DELTA_REPROBE_EVERY-th after are probes, which encode the
delta pages both ways and send the shorter; a region whose deltas were not
shorter than DELTA_PAYS x the compressed record sends those pages compressed
or plain (as above) until its next probe. Deltas cost little CPU (an XOR, and
zstd over mostly zero bytes), so wire bytes decide.
"""
from __future__ import annotations

import os
import threading
import time
from collections import deque
from dataclasses import dataclass, replace
from typing import Callable

import numpy as np

from xenmig import compressed, delta, emp, libxc
from xenmig.compressed import CompressedPages
from xenmig.emp import MODE_AUTO, MODE_OFF, MODE_ON
from xenmig.levels import LEVEL_FIGURES, choose_level
from xenmig.libxc import Encoded, PlainPages

from .deltacache import DeltaCache

REGION_PFNS = 1024          # a region: one block of pfns as iteration 0's batches cut them (locality)
SKIP_RATIO = 1.1            # a region that shrank less than this is sent plain ...
REPROBE_EVERY = 8           # ... and compressed again at its 8th visit since, in case it changed
PROBE_EVERY = 32            # sending plain, 1 batch in 32 is compressed, so that the figures stay fresh
HYSTERESIS = 0.1            # compression goes on when 10% faster than plain, off when 10% slower
RATE_WEIGHT = 0.25          # weight of a new batch in the running compression rate and ratio
LINK_WINDOW = 1.0           # seconds of writes the drain rate is measured over
LINK_BINDING = 0.5          # the writer blocked this share of the window: the link is the bottleneck
LINK_MIN_SPAN = 0.05        # seconds of writes the window's drain rate needs ...
# ... and the last writes' (they show a link that just fell first): one 4 MiB plain batch over
# 1 Gbit/s takes 0.034 s; a receiver still starting blocks the first write 0.01-0.02 s.
LINK_RECENT = 0.02
LINK_STALE = 2.0            # a link figure not measured again for this long is dropped (then plain re-measures)
# Guest bytes per second that go plain when the link does not bind: what the receiving xenguest
# restores plain pages at (the bench's `none` data phase on loopback: 994-1151 MB/s).
PLAIN_RATE = 1e9
# A batch at least this share zero pages is compressed while nothing is measured yet: its zero
# pages go as bits, and only the rest costs zstd.
ZERO_WORTH = 0.5
ZERO_SAMPLE = 16            # pages of a batch auto looks at to weigh its zero pages before choosing
MB = 1e6                    # the per-iteration report's rates are in MB/s
# Cores compression may count on: all but one, which the rest of the migration needs at once (the
# writer and the guest here, and the receiving xenguest when both ends share a host). Without it,
# on 2 cores over loopback, two compressing threads look about as fast as sending plain, while the
# receiver needs one of those cores.
SPARE_CORES = max(1, (os.cpu_count() or 1) - 1)
DELTA_PAYS = 0.9            # a region keeps deltas while they are below 0.9x the compressed record ...
DELTA_REPROBE_EVERY = 8     # ... measured at its first visit and every 8th since
PLAIN_PAGE_BYTES = compressed.PAGE_SIZE + 8     # a page and its pfn entry in PAGE_DATA
CACHE_FIELDS = ("cache_hits", "cache_misses", "cache_bytes", "cache_peak_bytes")


@dataclass(frozen=True)
class Measurements:
    """What auto decides from; None: not measured (yet)."""
    link: float | None          # wire bytes per second the stream fd drains; None: not the bottleneck
    compress: float | None      # data-page bytes per second one compression thread turns out (wall time)
    ratio: float | None         # data-page bytes per wire byte of recent compressed batches
    threads: int
    zero: float = 0.0           # the batch's share of zero pages (sent as bits when compressed)


def compress_wins(m: Measurements, compressing: bool) -> bool:
    """Whether compressing the next batch shortens the migration. Seconds per guest byte: plain,
    1/link (PLAIN_RATE when the link does not bind); compressed, only its data pages cost, the
    slower of compressing them, (1 - zero)/(compress x threads), and sending what is left of
    them, (1 - zero)/(ratio x link). So a batch of mostly zero pages is compressed whatever the
    link, and data that does not shrink only where the CPU outruns the link. Hysteresis keeps the
    current choice unless the other one is HYSTERESIS faster. A link not measured (yet) counts
    as fast: a slow one shows within LINK_RECENT of writes, and the writer then reconsiders the
    batches encoded plain ahead of it. Nothing measured of compression yet: a batch of mostly
    zero pages is compressed, any other goes plain. Data seen not to shrink (recent ratio under
    SKIP_RATIO) goes plain unless the batch is mostly zero pages, whatever the link: compressing
    it cannot shorten the migration, only cost CPU."""
    if m.ratio is not None and m.ratio < SKIP_RATIO and m.zero < ZERO_WORTH:
        return False
    if m.compress is None or m.ratio is None:
        return m.zero >= ZERO_WORTH
    data = 1 - m.zero
    plain = 1 / (m.link or PLAIN_RATE)
    packed = max(data / (m.compress * m.threads), data / (m.ratio * m.link) if m.link else 0.0)
    return packed < plain * ((1 + HYSTERESIS) if compressing else (1 - HYSTERESIS))


def drain_rate(nbytes: int, blocked: float, span: float, min_span: float = LINK_MIN_SPAN) -> float | None:
    """The link's rate from writes that took `span` seconds, `blocked` of them waiting in
    write_all: when the writer waited for most of it, the socket buffer stayed full and the link
    carried all it could, so the bytes over the span are its rate; otherwise it is not the
    bottleneck and its rate is not measurable (None), nor over less than `min_span`."""
    if span < min_span or blocked < LINK_BINDING * span:
        return None
    return nbytes / span


class LinkMeter:
    """The stream fd's drain rate from the saver's writes (end, wire bytes, seconds blocked):
    over the last writes that span LINK_RECENT if the link bound them (so that a link that
    falls shows within a batch or two, not once it weighs half of the window), else over the
    last LINK_WINDOW seconds. A figure measured while the link bound stands while the writer no
    longer waits (compression may have made the stream thinner than the link),
    for LINK_STALE seconds at most and only while the bytes moved do not show a faster link."""

    def __init__(self) -> None:
        self._writes: deque[tuple[float, int, float]] = deque()
        self._bound: float | None = None
        self._measured = 0.0            # when the figure was last measured
        self._lock = threading.Lock()

    def add(self, nbytes: int, seconds: float, end: float) -> None:
        with self._lock:
            self._writes.append((end, nbytes, seconds))
            while self._writes and self._writes[0][0] < end - LINK_WINDOW:
                self._writes.popleft()

    def _recent(self) -> float | None:
        """The drain rate over the last writes that span LINK_RECENT, if the link bound them."""
        nbytes, blocked, end = 0, 0.0, self._writes[-1][0]
        for write_end, size, seconds in reversed(self._writes):
            nbytes, blocked = nbytes + size, blocked + seconds
            span = end - (write_end - seconds)
            if span >= LINK_RECENT:
                return drain_rate(nbytes, blocked, span, LINK_RECENT)
        return None

    def rate(self) -> float | None:
        with self._lock:
            if not self._writes:
                return self._bound
            first_end, _, first_blocked = self._writes[0]
            span = self._writes[-1][0] - (first_end - first_blocked)
            nbytes = sum(w[1] for w in self._writes)
            rate = self._recent()
            if rate is None:
                rate = drain_rate(nbytes, sum(w[2] for w in self._writes), span)
            if rate is not None:
                self._bound, self._measured = rate, self._writes[-1][0]
            elif self._bound is not None and (span > 0 and nbytes / span > self._bound
                                              or self._writes[-1][0] - self._measured > LINK_STALE):
                # it carries more than the old figure, or that figure is old (the link may have
                # changed, or it was the receiver starting up): measure again from here
                self._bound = None
                self._writes.clear()
            return self._bound


class ChosenPlain(Encoded):
    """A batch sent plain because of the link or the mode, not its data: the writer asks the
    encoder again just before writing it (`reconsider`)."""


@dataclass
class PassFigures:
    """One pass's counters for its XENMIG_ITERATION report."""
    compressed_batches: int = 0
    plain_batches: int = 0
    levels: set[int] | None = None
    compress_pages: int = 0         # data pages given to zstd, whether their record went compressed or not
    compress_bytes: int = 0         # data-page bytes given to zstd (zero pages go as bits)
    compress_seconds: float = 0.0   # wall seconds zstd took, summed over threads
    write_bytes: int = 0
    write_seconds: float = 0.0      # seconds blocked writing them
    write_start: float | None = None
    write_end: float = 0.0
    delta_pages: int = 0
    delta_saved: float = 0.0        # estimated wire bytes saved against the compressed records (delta_saved_estimate)

    def report(self) -> dict:
        link = drain_rate(self.write_bytes, self.write_seconds, self.write_end - (self.write_start or 0.0))
        return {"compressed_batches": self.compressed_batches, "plain_batches": self.plain_batches,
                "delta_pages": self.delta_pages, "delta_saved_bytes": max(0, round(self.delta_saved)),
                "compress_pages": self.compress_pages,
                "levels": sorted(self.levels or ()), "link_mbps": None if link is None else round(link / MB, 1),
                "compress_mbps": round(self.compress_bytes / self.compress_seconds / MB, 1)
                if self.compress_seconds > 0 else None}


@dataclass
class Region:
    ratio: float
    skips: int = 0


@dataclass
class DeltaRegion:
    """What the last probe of a region measured: whether its deltas paid, and what its delta
    pages cost compressed, per page (the estimate of delta_saved_bytes until the next probe)."""
    pays: bool
    compressed_per_page: float
    visits: int = 0


def delta_saved_estimate(pages: int, delta_bytes: int, compressed_per_page: float | None,
                         ratio: float | None) -> float:
    """Wire bytes a delta record of `pages` saved against the same pages compressed: measured on
    probes; otherwise the pages at the region's last probed compressed cost, or the running
    ratio of compressed batches, or (nothing compressed yet) plain PAGE_DATA's."""
    if compressed_per_page is not None:
        per_page = compressed_per_page
    elif ratio is not None:
        per_page = compressed.PAGE_SIZE / ratio + 8
    else:
        per_page = PLAIN_PAGE_BYTES
    return pages * per_page - delta_bytes


def _record_bytes(buffers: list) -> int:
    """The wire bytes of encoded record buffers."""
    return sum(memoryview(b).nbytes for b in buffers)


def _running(old: float | None, new: float) -> float:
    return new if old is None else old + RATE_WEIGHT * (new - old)


class AdaptivePages:
    """The encoder a save uses whatever its mode: thread-safe, and switchable between batches
    from another thread (`switch`). Plain batches go as PlainPages (guest memory read once, by
    writev); compressed ones through CompressedPages, whose snapshot rule stands."""

    def __init__(self, mode: str, level: int | None = None, threads: int | None = None,
                 delta_cache: int = 0) -> None:
        """`delta_cache`: the bound in bytes of the cache of sent pages (0: no deltas); the cache
        is made at the save's first pass, when the domain's size is known."""
        self.codec = CompressedPages(level, threads)
        self.delta_cache = delta_cache
        self.cache: DeltaCache | None = None
        self._iteration = 0
        self._delta_regions: dict[int, DeltaRegion] = {}
        self.threads = self.codec.threads
        self.mode, self._pinned = mode, level     # a level given pins auto's choice (until the next switch)
        self.link = LinkMeter()
        self._lock = threading.Lock()
        self._compress: float | None = None
        self._ratio: float | None = None
        self._regions: dict[int, Region] = {}
        self._batches = 0
        self._compressing = False
        self._pass = PassFigures()

    def switch(self, mode: str, level: int | None = None) -> int:
        """Change the mode (and level) from the next batch encoded; returns the level in force."""
        with self._lock:
            self.mode, self._pinned = mode, level
            if level is not None:
                self.codec.level = level
            return self.codec.level

    def measurements(self) -> Measurements:
        link = self.link.rate()
        return Measurements(link, self._compress, self._ratio, min(self.threads, SPARE_CORES))

    def _level(self, m: Measurements) -> int:
        """choose_level with the table's compression rates scaled to what this save measures at
        its current level (the CPU it really gets: shared with the receiver, other migrations)."""
        figures = LEVEL_FIGURES
        if m.compress is not None and self.codec.level in figures:
            scale = m.compress / figures[self.codec.level].compress_bytes_per_s
            figures = {level: replace(f, compress_bytes_per_s=f.compress_bytes_per_s * scale)
                       for level, f in figures.items()}
        return choose_level(m.link, self.threads, figures)

    def _choose(self, region: int, zero: float) -> tuple[int | None, bool]:
        """The level to compress this batch at, or None for plain; `zero`: its share of zero
        pages. And whether a plain choice came from the mode or the link (not from the region's
        data), so that the writer may reconsider it."""
        with self._lock:
            if self.mode == MODE_OFF:
                return None, True
            if self.mode == MODE_ON:
                return self.codec.level, False
            m = replace(self.measurements(), zero=zero)
            if self._pinned is None:
                self.codec.level = self._level(m)
            known = self._regions.get(region)
            if known is not None and known.ratio < SKIP_RATIO and zero < ZERO_WORTH:
                known.skips += 1
                return (self.codec.level if known.skips % REPROBE_EVERY == 0 else None), False
            if known is not None:           # what this region reached is the better guess
                m = replace(m, ratio=known.ratio)
            self._compressing = compress_wins(m, self._compressing)
            self._batches += 1
            probe = self._batches % PROBE_EVERY == 1
            return (self.codec.level if self._compressing or probe else None), True

    def reconsider(self, pfns: np.ndarray, pages: Callable[[], np.ndarray], encoded: Encoded) -> Encoded:
        """The writer's last look at a batch before it writes it: one encoded plain by a choice
        that has changed since (a switch on, or auto's link figure now binding) is compressed
        now, on the writer's thread, while the socket drains what it holds. Without it a
        switch applied only after the 2 x threads batches already encoded ahead (at 1 Gbit/s,
        4 MiB plain batches: 0.17 s). Not through the cache: the batch's pfns were forgotten
        when it was encoded plain, and stay so (the cache claims only what it saw sent)."""
        if not isinstance(encoded, ChosenPlain):
            return encoded
        with self._lock:
            if not (self.mode == MODE_ON or self.mode == MODE_AUTO and self._compressing):
                return encoded
            self._pass.plain_batches -= 1
        return self._encode(pfns, pages())

    def start_pass(self, iteration: int, npages: int) -> None:
        """A pass of the save starts (deltas only from iteration 1: pages re-sent)."""
        self._iteration = iteration
        if self.delta_cache and self.cache is None:
            self.cache = DeltaCache(self.delta_cache, npages)
        if self.cache is not None:
            self.cache.start_pass(iteration)

    def encode(self, pfns: np.ndarray, pages: np.ndarray) -> Encoded:
        cache = self.cache
        if cache is None:
            return self._encode(pfns, pages)
        if self.mode == MODE_OFF or self.mode == MODE_AUTO and not self._compressing or not cache.useful(pfns):
            # From guest memory as without a cache (plain: read once, by writev): the cache never
            # sees the bytes, and no longer claims the pfns. Auto keeps it only while compressing
            # pays (the link binds): a delta only shrinks the wire, and where the wire does not
            # bind, copying pages into the cache is CPU the migration waits for.
            encoded = self._encode(pfns, pages)
            cache.forget(pfns)
            return encoded
        if self._iteration == 0 or cache.nfree:
            # A batch the cache holds none of (all of iteration 0's): the compressor's reads, the
            # zero test, then the data pages copied once, straight into free slots; the record is
            # encoded from the slots, which keep exactly what was sent.
            zero = compressed.zero_pages(pages)
            reserved = cache.reserve(pfns, zero)
            if reserved is not None:
                encoded = self._encode(pfns, None, zero, cache.fill(reserved, pages, ~zero))
                cache.commit(pfns, zero, reserved)
                return encoded
        # The snapshot rule with a cache: guest memory is read once, into `sent`; every record of
        # the batch is encoded from it, and it is what the cache keeps (what the receiver holds).
        # Scattered pfns (every pass after the first) arrive gathered already, in an array of their
        # own (save.frames): that gather is the one read, and the snapshot.
        sent = pages if pages.flags.owndata else np.array(pages)
        zero = compressed.zero_pages(sent)
        buffers: list = []
        zero_sent = 0
        use = None
        if self._iteration > 0:
            hit, bases = cache.lookup(pfns)
            use = hit & ~zero                    # a zero page goes cheaper as a bit
            region = int(pfns[0]) // REGION_PFNS
            if use.all():                        # (no boolean-index copies of 4 MiB)
                buffers = self._delta(pfns, sent, bases, region)
            elif use.any():
                buffers = self._delta(pfns[use], sent[use], bases[~zero[hit]], region)
            if not buffers:
                use = None
        if use is None:
            encoded = self._encode(pfns, sent, zero)
            buffers, zero_sent = encoded.buffers, encoded.zero_pages
        elif not use.all():
            rest = ~use
            encoded = self._encode(pfns[rest], sent[rest], zero[rest])
            buffers, zero_sent = buffers + encoded.buffers, encoded.zero_pages
        cache.store(pfns, sent, zero)
        return Encoded(buffers, zero_sent)

    def _delta(self, pfns: np.ndarray, news: np.ndarray, bases: np.ndarray, region: int) -> list:
        """The buffers for the pages that have a base: a DELTA_PAGE_DATA record, or on a probe
        whichever of it and the compressed record is shorter; [] when auto's region says no."""
        with self._lock:
            mode = self.mode
            known = self._delta_regions.get(region)
            if known is not None:
                known.visits += 1
            probe = mode != MODE_ON and (known is None or known.visits % DELTA_REPROBE_EVERY == 0)
            if mode != MODE_ON and not probe and known is not None and not known.pays:
                return []
            level, ratio = self.codec.level, self._ratio
        record, _ = delta.build(pfns, news, bases, lambda data: self.codec._compress(data, level))
        delta_bytes = _record_bytes(record)
        per_page = None if known is None else known.compressed_per_page
        if probe:
            packed = self.codec.encode(pfns, news, level).buffers
            packed_bytes = _record_bytes(packed)
            pays = delta_bytes < DELTA_PAYS * packed_bytes
            with self._lock:
                self._delta_regions[region] = DeltaRegion(pays, packed_bytes / len(pfns))
            if packed_bytes <= delta_bytes:
                return packed
            per_page = packed_bytes / len(pfns)
        with self._lock:
            self._pass.delta_pages += len(pfns)
            self._pass.delta_saved += delta_saved_estimate(len(pfns), delta_bytes, per_page, ratio)
        return record

    def _encode(self, pfns: np.ndarray, pages: np.ndarray | None, zero: np.ndarray | None = None,
                data: np.ndarray | None = None) -> Encoded:
        """`data`: the batch's data pages copied out already (then `pages` is None and `zero` is
        given: a plain record is made of that snapshot, never of guest memory)."""
        # The zero test is the first of the compressor's reads (its snapshot rule). `on` does it
        # here; `auto` weighs the batch's zero pages from ZERO_SAMPLE of them, so that a batch it
        # sends plain is read once (by writev), as under `off`, which skips it.
        if zero is None and self.mode == MODE_ON:
            zero = compressed.zero_pages(pages)
        if zero is not None:
            share = float(zero.mean())
        elif self.mode == MODE_OFF:
            share = 0.0
        else:
            share = float(compressed.zero_pages(pages[::max(1, len(pfns) // ZERO_SAMPLE)]).mean())
        level, by_choice = self._choose(int(pfns[0]) // REGION_PFNS, share)
        if level is None:
            encoded = PlainPages().encode(pfns, pages if data is None else compressed.snapshot_frames(zero, data))
            with self._lock:
                self._pass.plain_batches += 1
            return ChosenPlain(*encoded) if by_choice and data is None else encoded
        if zero is None:                # auto compresses it (or switched on since the test)
            zero = compressed.zero_pages(pages)
        nonzero = int(len(pfns) - zero.sum())
        # A sample that says the batch would go plain spares zstd the whole batch (random memory);
        # its figures then count as plain's: the compression rate is measured on whole batches only.
        start = time.monotonic()
        whole = not self.codec.sample_says_plain(pages, zero, level, data)
        encoded = self.codec.pack(pfns, pages, level, zero, data) if whole else \
            PlainPages().encode(pfns, pages if data is None else compressed.snapshot_frames(zero, data))
        seconds = time.monotonic() - start
        nbytes = nonzero * compressed.PAGE_SIZE          # what zstd had to work on
        rtype, length = libxc.parse_record_header(encoded.buffers[0])
        packed = rtype == compressed.REC_TYPE
        with self._lock:
            if nbytes:
                ratio = nbytes / (libxc.RH_SIZE + length + libxc.padding(length))
                self._regions[int(pfns[0]) // REGION_PFNS] = Region(ratio)
                self._ratio = _running(self._ratio, ratio)
                if whole and seconds > 0:
                    self._compress = _running(self._compress, nbytes / seconds)
            figures = self._pass
            if whole:
                figures.compress_pages += nonzero
                figures.compress_bytes += nbytes
                figures.compress_seconds += seconds
            else:                                   # zstd read the sample only
                figures.compress_pages += min(nonzero, compressed.SAMPLE_PAGES)
            if packed:
                figures.compressed_batches += 1
                figures.levels = (figures.levels or set()) | {level}
            else:
                figures.plain_batches += 1
        return encoded

    def wrote(self, nbytes: int, seconds: float) -> None:
        """The saver wrote `nbytes` to the stream fd, blocked `seconds` doing so."""
        end = time.monotonic()
        self.link.add(nbytes, seconds, end)
        with self._lock:
            figures = self._pass
            figures.write_bytes += nbytes
            figures.write_seconds += seconds
            if figures.write_start is None:
                figures.write_start = end - seconds
            figures.write_end = end

    def end_pass(self) -> dict:
        """The finished pass's figures (XENMIG_ITERATION's fields but the pass's own); a new pass starts."""
        with self._lock:
            figures, self._pass = self._pass, PassFigures()
            cache = self.cache.counters() if self.cache is not None else dict.fromkeys(CACHE_FIELDS, 0)
            return {**figures.report(), **cache, "mode": self.mode}


def mode_from_environment(compress: bool) -> str:
    """`-compress true` starts in on, otherwise off; standalone experiments may set
    XENGUEST_COMPRESS_MODE (off, on, auto)."""
    mode = os.environ.get("XENGUEST_COMPRESS_MODE") or (MODE_ON if compress else MODE_OFF)
    return emp.parse_compress_mode(mode)[0]

