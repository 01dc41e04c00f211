"""`xenguest -mode inspect`: what a saved stream holds, record by record, without a domain.

Also home of `walk`, the one reader of saved streams that `convert` shares:
it recognises the input (a bare libxc stream, a suspend image, or either
zstd-compressed as a whole by the legacy `stream` method), validates every
record with the restorer's walk (xenmig.libxcwalk; a pfn bound of 2^52 stands
in for the domain)
and yields the input's parts in order with their exact bytes. It holds one
record at a time, so memory stays bounded whatever the stream's size (inspect's
report adds a crc32 per pfn, BaseCrcs).
"""
from __future__ import annotations

import io
import os
import struct
import sys
from dataclasses import dataclass, field
from typing import Callable, Iterator, TextIO

import numpy as np
import zstandard

from xenemu.memory import PAGE_SIZE
from xenmig import compressed, delta, image, imagewalk, libxc, libxcwalk, sexp
from xenmig.fdio import Truncated
from xenmig.libxcwalk import Headers, Source, SourceReader as Input

# No domain to check pfns against: any pfn the format can express is accepted.
NPAGES = 1 << 52
MAGIC_SIZE = 4
KINDS = {struct.pack("!Q", libxc.IHDR_MARKER)[:MAGIC_SIZE]: "libxc stream",
         image.SIGNATURE[:MAGIC_SIZE]: "suspend image"}


# Input ----------------------------------------------------------------------
class _Replay(io.RawIOBase):
    """A source whose first bytes were read to recognise it: gives them back, then the rest."""

    def __init__(self, head: bytes, source: Source) -> None:
        super().__init__()
        self.head = head
        self.source = source

    def readable(self) -> bool:
        return True

    def readinto(self, view) -> int:  # type: ignore[no-untyped-def, override]
        if not self.head:
            return self.source(view)
        n = min(len(view), len(self.head))
        view[:n] = self.head[:n]
        self.head = self.head[n:]
        return n


def _zstd_source(raw: io.RawIOBase) -> Source:
    """Streaming decompression: memory bounded by zstd's window, whatever the ratio."""
    reader = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True, closefd=False)

    def readinto(view: memoryview) -> int:
        try:
            return reader.readinto(view)
        except zstandard.ZstdError as e:
            raise libxc.StreamError(f"zstd: {e}") from None
    return readinto


def open_input(fd: int) -> tuple[Input, str, bool]:
    """Recognise the input; returns (a reader from its first byte, its kind, zstd-compressed?)."""
    source: Source = lambda view: os.readv(fd, [view])
    head = Input(source).read(MAGIC_SIZE, "the first bytes")
    stream_compressed = head == compressed.ZSTD_MAGIC      # as xenopsd-shim vm-resume (codecs.from_head)
    if stream_compressed:
        source = _zstd_source(_Replay(head, source))
        head = Input(source).read(MAGIC_SIZE, "the first decompressed bytes")
    if head not in KINDS:
        raise libxc.StreamError(f"neither a libxc stream, a suspend image nor zstd (starts with {head.hex(' ')})")
    return Input(_Replay(head, source).readinto), KINDS[head], stream_compressed


# The walk -------------------------------------------------------------------
@dataclass
class Start:
    kind: str                   # "libxc stream" or "suspend image"
    stream_compressed: bool     # zstd as a whole: offsets below are in the decompressed data


@dataclass
class Framing:
    """Suspend-image framing: the signature (htype None), or a header and its payload."""
    offset: int
    htype: int | None
    raw: bytes

    @property
    def payload(self) -> bytes:
        return self.raw[image.HEADER_SIZE:]


@dataclass
class Pages:
    """What a page record carries; arrays view the walk's buffer."""
    entries: np.ndarray         # every pfn entry, in record order
    data: int                   # entries that carry a page
    zero: np.ndarray            # over those pages: sent as a bitmap bit (compressed records only)
    wire: int                   # page bytes on the wire: the pages, or the zstd frame
    inflated: bytes = b""       # compressed: the frame inflated (the non-zero pages, in order);
                                # delta: the XOR deltas, in entry order
    pfns: np.ndarray | None = None          # the data-carrying entries' pfns, in order
    plain: np.ndarray | None = None         # PAGE_DATA: its frames (views of the body)
    delta: delta.DeltaRecord | None = None  # DELTA_PAGE_DATA: its parsed fields (pages need bases)

    def frames(self) -> np.ndarray:
        """The data pages of a PAGE_DATA or COMPRESSED_PAGE_DATA record, in order (zero pages as zeros)."""
        if self.plain is not None:
            return self.plain
        frames = np.zeros((self.data, PAGE_SIZE), dtype=np.uint8)
        frames[~self.zero] = np.frombuffer(self.inflated, dtype=np.uint8).reshape(-1, PAGE_SIZE)
        return frames


@dataclass
class Record:
    """One libxc record; `raw` (header, body, padding) is valid until the walk moves on."""
    offset: int
    rtype: int
    length: int                 # of the body
    raw: memoryview
    pages: Pages | None = None


Part = Start | Framing | Headers | Record


def walk(fd: int) -> Iterator[Part]:
    """The input's parts in order, each validated before it is yielded."""
    try:
        r, kind, stream_compressed = open_input(fd)
        yield Start(kind, stream_compressed)
        yield from _libxc(r) if kind == "libxc stream" else _image(r)
        if not r.at_end():
            raise libxc.StreamError(f"data after the end of the {kind} at offset {r.offset}")
    except Truncated as e:
        raise libxc.StreamError(str(e)) from None
    except image.ImageError as e:
        raise libxc.StreamError(str(e)) from None


def _image(r: Input) -> Iterator[Part]:
    """The image walk's framing (not the restore reader's placement rules), libxc streams inline."""
    yield Framing(0, None, imagewalk.read_signature(r))
    for h in imagewalk.headers(r, restore=False):
        yield Framing(h.offset, h.htype, h.raw + h.payload)
        if h.action == image.Action.XENGUEST:
            yield from _libxc(r)


def _libxc(r: Input) -> Iterator[Headers | Record]:
    """The walk's records, page records described (the restorer applies the same walk to a domain)."""
    for part in libxcwalk.walk(r, locate=True):
        if isinstance(part, Headers):
            yield part
            continue
        record = Record(part.offset, part.rtype, part.length, part.raw)
        if part.rtype in _PAGE_RECORDS:
            record.pages = _PAGE_RECORDS[part.rtype](part.body)
        yield record


def _plain_pages(body: memoryview) -> Pages:
    pd = libxc.parse_page_data(body, NPAGES)
    count = struct.unpack_from(libxc.PAGE_DATA_FORMAT, body)[0]
    entries = np.frombuffer(body, dtype="<u8", count=count, offset=libxc.PAGE_DATA_SIZE)
    frames = np.frombuffer(body, dtype=np.uint8, offset=pd.data_offset).reshape(-1, PAGE_SIZE)
    return Pages(entries, pd.pfns.size, np.zeros(pd.pfns.size, dtype=bool), PAGE_SIZE * pd.pfns.size,
                 pfns=pd.pfns, plain=frames)


def _compressed_pages(body: memoryview) -> Pages:
    """Inflated here, as the restorer does: a payload that does not inflate is an invalid stream."""
    pfns, zero, payload = compressed.parse(body, NPAGES)
    count = struct.unpack_from(compressed.HEADER_FORMAT, body)[0]
    entries = np.frombuffer(body, dtype="<u8", count=count, offset=compressed.HEADER_SIZE)
    nonzero = int((~zero).sum())
    inflated = compressed.inflate(payload, PAGE_SIZE * nonzero) if nonzero else b""
    return Pages(entries, pfns.size, zero, len(payload), inflated, pfns=pfns)


def _delta_pages(body: memoryview) -> Pages:
    """Inflated here, as the restorer does; its crcs need the bases (BaseCrcs, convert's PageStore)."""
    record = delta.parse(body, NPAGES)
    count = record.pfns.size
    entries = np.frombuffer(body, dtype="<u8", count=count, offset=delta.HEADER_SIZE)
    inflated = compressed.inflate(record.payload, PAGE_SIZE * count, delta.NAME)
    return Pages(entries, count, np.zeros(count, dtype=bool), len(record.payload), inflated,
                 pfns=record.pfns, delta=record)


_PAGE_RECORDS: dict[int, Callable[[memoryview], Pages]] = {
    libxc.REC_TYPE_PAGE_DATA: _plain_pages, compressed.REC_TYPE: _compressed_pages, delta.REC_TYPE: _delta_pages}


class BaseCrcs:
    """The crc32 of the page the stream last sent for each pfn below TRACKED_PFNS (64 GiB of guest
    memory: at most 80 MiB of arrays, whatever a stream claims): what a delta's base crcs are
    checked against without holding the pages."""

    TRACKED_PFNS = 1 << 24

    def __init__(self) -> None:
        self.crcs = np.zeros(0, dtype=np.uint32)
        self.known = np.zeros(0, dtype=bool)

    def _tracked(self, pfns: np.ndarray) -> np.ndarray:
        """The mask of `pfns` tracked, the arrays grown (doubling) to hold them."""
        tracked = pfns < self.TRACKED_PFNS
        top = int(pfns[tracked].max()) + 1 if tracked.any() else 0
        if top > len(self.crcs):
            size = min(self.TRACKED_PFNS, max(top, 2 * len(self.crcs)))
            self.crcs = np.concatenate([self.crcs, np.zeros(size - len(self.crcs), dtype=np.uint32)])
            self.known = np.concatenate([self.known, np.zeros(size - len(self.known), dtype=bool)])
        return tracked

    def check(self, rec: Record) -> str:
        """Follow one page record; for a delta record, what its base check found (for its line)."""
        p = rec.pages
        if p is None or p.pfns is None:
            return ""
        tracked = self._tracked(p.pfns)
        pfns = p.pfns[tracked].astype(np.int64)
        if p.delta is None:
            self.crcs[pfns] = delta.crc32s(p.frames())[tracked]
            self.known[pfns] = True
            return ""
        held = self.known[pfns]
        wrong = np.flatnonzero(held & (self.crcs[pfns] != p.delta.base_crcs[tracked]))
        if wrong.size:
            i = int(wrong[0])
            raise libxc.StreamError(f"{delta.NAME} at offset {rec.offset}: base of pfn 0x{int(pfns[i]):x} has crc32 "
                                    f"{int(p.delta.base_crcs[tracked][i]):08x}, the stream last sent it with "
                                    f"{int(self.crcs[pfns[i]]):08x}")
        self.crcs[pfns] = p.delta.result_crcs[tracked]
        self.known[pfns] = True
        missing, unchecked = int((~held).sum()), int((~tracked).sum())
        if not missing and not unchecked:
            return ", base crcs ok"
        return (f", bases of {missing} pfns not in this stream" if missing else "") + \
               (f", {unchecked} pfns beyond {self.TRACKED_PFNS} not checked" if unchecked else "")


# The report -------------------------------------------------------------------
@dataclass
class Totals:
    records: int = 0
    pages: int = 0
    zero: int = 0
    wire: int = 0
    by_type: dict[str, int] = field(default_factory=dict)

    def add(self, rec: Record) -> None:
        self.records += 1
        name = libxc.record_name(rec.rtype)
        self.by_type[name] = self.by_type.get(name, 0) + 1
        if rec.pages is not None:
            self.pages += rec.pages.data
            self.zero += int(rec.pages.zero.sum())
            self.wire += rec.pages.wire


def _ratio(inflated: int, wire: int) -> str:
    if not inflated:
        return "-"
    return f"{inflated / wire:.2f}" if wire else "inf"


_FRAMING_NOTES = {image.LIBXC: ": the libxc stream follows",
                  image.LIBXC_LEGACY: ": a libxc stream follows (the real reader hands it to xenguest as Libxc)",
                  image.QEMU_TRAD: ": device-model state, skipped",
                  image.DEMU: ": a vGPU stream, on its own fd (not in this input)",
                  image.VARSTORED: ": UEFI variables, skipped (no varstored here)",
                  image.SWTPM0: ": vTPM state (first format), skipped (no swtpm here)",
                  image.SWTPM: ": vTPM state, skipped (no swtpm here)",
                  image.LIBXL: ": refused, as the real reader refuses it",
                  image.QEMU_XEN: ": refused, as the real reader refuses it"}


def describe_xenops(payload: bytes) -> str:
    """The record's fields; vm_str printed as an S-expression atom, so it stays on one line."""
    rec = image.parse_xenops_record(payload)
    parts = [f"time {rec.time}", f"word_size {rec.word_size}",
             "no vm_str" if rec.vm_str is None else f"vm_str {sexp.quote(rec.vm_str)}"]
    if rec.xs_subtree is not None:
        parts.append(f"xs_subtree of {len(rec.xs_subtree)} entries")
    return ", ".join(parts)


def describe(part: Part) -> str:
    """One line per part; offsets are in the (decompressed) input."""
    if isinstance(part, Start):
        how = ", zstd-compressed as a whole (legacy stream method); offsets are in the decompressed data"
        return f"input: {part.kind}" + (how if part.stream_compressed else "")
    if isinstance(part, Framing):
        if part.htype is None:
            return f"{part.offset:>12}  suspend image signature {part.raw!r}"
        line = f"{part.offset:>12}  image header {image.name(part.htype)}, length {len(part.payload)}"
        if part.htype == image.XENOPS:
            return f"{line}: {describe_xenops(part.payload)}"
        return line + _FRAMING_NOTES.get(part.htype, "")
    if isinstance(part, Headers):
        dtype, page_shift, _, major, minor = part.domain
        return (f"{part.offset:>12}  libxc stream v{part.version}, {libxc.DHDR_TYPES[dtype]}, "
                f"page shift {page_shift}, Xen {major}.{minor}\n"
                f"{'offset':>12}  {'record':<22} {'length':>9}")
    line = f"{part.offset:>12}  {libxc.record_name(part.rtype):<22} {part.length:>9}"
    p = part.pages
    if p is None:
        return line
    line += f"  pfns {len(p.entries)}"
    if part.rtype == compressed.REC_TYPE:
        line += (f", zero {int(p.zero.sum())}, payload {p.wire}, inflated {PAGE_SIZE * p.data}, "
                 f"ratio {_ratio(PAGE_SIZE * p.data, p.wire)}")
    if part.rtype == delta.REC_TYPE:
        line += f", deltas, payload {p.wire}, inflated {PAGE_SIZE * p.data}, ratio {_ratio(PAGE_SIZE * p.data, p.wire)}"
    return line


def run(fd: int, out: TextIO = sys.stdout) -> int:
    """Print every part of the input, then the totals; `inflated` counts zero pages as 4096 bytes."""
    totals = Totals()
    bases = BaseCrcs()
    for part in walk(fd):
        if isinstance(part, Record):
            print(describe(part) + bases.check(part), file=out)
            totals.add(part)
        else:
            print(describe(part), file=out)
    inflated = PAGE_SIZE * totals.pages
    print(f"totals: records {totals.records}, pages {totals.pages}, zero pages {totals.zero}, "
          f"page data on the wire {totals.wire} bytes, inflated {inflated} bytes, "
          f"ratio {_ratio(inflated, totals.wire)}", file=out)
    print("records by type: " + ", ".join(f"{n} {c}" for n, c in totals.by_type.items()), file=out)
    return 0
