"""COMPRESSED_PAGE_DATA (0x13): this project's in-band compressed page record.

Mandatory (an old receiver must fail, not drop memory). Each record is one
independent zstd frame, so the sender may choose per record and a receiver
may inflate records in parallel. Full description: docs/compressed-page-data.md.

Body (little-endian):
    0   u32  count            pfn entries, 1..1024
    4   u16  algorithm        1 = zstd
    6   u16  reserved         zero
    8   u32  zero_count       entries that are all-zero pages (no data sent)
    12  u32  payload_length   bytes of the zstd frame
    16  count x u64           pfn entries, encoded as in PAGE_DATA
    ..  ceil(count/8) bytes   zero-page bitmap (bit i of byte i//8 set: entry i is a zero page),
                              zero-padded to a multiple of 8 bytes
    ..  payload               one zstd frame: the 4096-byte frames of the other data-carrying
                              entries, in entry order; exactly 4096 x (data pages - zero_count) bytes;
                              its header declares that size, a content checksum, no dictionary and
                              a window of at most 4 MiB
"""
from __future__ import annotations

import os
import struct
import threading

import numpy as np
import zstandard

from xenemu.memory import PAGE_SIZE

from . import libxc
from .levels import default_level
from .libxc import Encoded, PlainPages

REC_TYPE = libxc.REC_TYPE_COMPRESSED_PAGE_DATA
HEADER_FORMAT = "<IHHII"
HEADER_SIZE = struct.calcsize(HEADER_FORMAT)       # 16
ALGORITHM_ZSTD = 1
# Set (to anything) in a restoring xenguest's environment: it refuses these records as a xenguest
# from before them does (an older host, emulated by `serve --no-in-band`).
REFUSE_ENV = "XENGUEST_REFUSE_COMPRESSED"


def bitmap_size(count: int) -> int:
    return ((count + 7) // 8 + 7) & ~7


# Build ----------------------------------------------------------------------
def zero_pages(pages: np.ndarray) -> np.ndarray:
    """Which pages of a batch are all zero (one read of each)."""
    return np.bitwise_or.reduce(pages.view("<u8"), axis=1) == 0


# A batch is first judged by one frame of SAMPLE_PAGES of its data pages spread over it (1/64 of a
# full batch): random memory, where the whole batch's frame would be discarded for plain PAGE_DATA,
# then costs zstd 64 KiB instead of 4 MiB (and no snapshot). Pages in a guest are of one kind each
# (zero, code, text, random: xenemu/profiles.py), so a spread sample predicts the batch's ratio.
SAMPLE_PAGES = 16


def record_length(count: int, payload: int) -> int:
    """The body of a record of `count` pfns carrying a `payload`-byte frame."""
    return HEADER_SIZE + 8 * count + bitmap_size(count) + payload


def plain_length(count: int) -> int:
    """The body of the PAGE_DATA record of the same `count` pages."""
    return libxc.PAGE_DATA_SIZE + (8 + PAGE_SIZE) * count


def snapshot_frames(zero: np.ndarray, data: np.ndarray) -> np.ndarray:
    """A batch's frames from its zero mask and its copied-out data pages (a plain record of a
    snapshot: the bytes sent are the ones copied, zero pages as zeros)."""
    frames = np.zeros((len(zero), PAGE_SIZE), dtype=np.uint8)
    frames[~zero] = data
    return frames


class CompressedPages:
    """Encoder for the saver: zero pages as bits, the rest as one zstd frame.

    A batch whose frame would not be smaller than plain PAGE_DATA goes out as
    plain PAGE_DATA, so incompressible memory costs nothing on the wire; when a
    sample of it already says so, it costs no zstd of the whole batch either.
    """

    def __init__(self, level: int | None = None, threads: int | None = None) -> None:
        # May change between batches (choose_level); each thread keeps a context per level.
        self.level = level if level is not None else default_level()
        self.threads = threads or int(os.environ.get("XENGUEST_COMPRESS_THREADS", 0)) or os.cpu_count() or 1
        self._local = threading.local()      # a zstd context is not thread-safe: one per thread

    def _compress(self, data: np.ndarray, level: int) -> bytes:
        contexts = getattr(self._local, "cctx", None)
        if contexts is None:
            contexts = self._local.cctx = {}
        if level not in contexts:
            contexts[level] = zstandard.ZstdCompressor(level=level, write_content_size=True, write_checksum=True)
        return contexts[level].compress(data)

    def sample_ratio(self, pages: np.ndarray | None, zero: np.ndarray, level: int,
                     data: np.ndarray | None = None) -> float | None:
        """Data bytes per frame byte of one frame of SAMPLE_PAGES of the batch's data pages, spread
        over it (from `data`, its copied-out data pages, when given); None for a batch with no more
        data pages than that (its own frame costs as little). The fancy index copies the sample
        out (one read of each page): it only decides whether the batch is compressed, and never
        goes on the wire, so guest writes cannot reach a record."""
        rows = np.flatnonzero(~zero) if data is None else np.arange(len(data))
        if len(rows) <= SAMPLE_PAGES:
            return None
        picked = rows[np.linspace(0, len(rows) - 1, SAMPLE_PAGES).astype(np.intp)]
        sample = (pages if data is None else data)[picked]
        return sample.nbytes / len(self._compress(sample, level))

    def sample_says_plain(self, pages: np.ndarray | None, zero: np.ndarray, level: int,
                          data: np.ndarray | None = None) -> bool:
        """Whether the batch's record, its payload shrunk as its sample's, would not be shorter than
        plain PAGE_DATA (encode's own rule, predicted)."""
        ratio = self.sample_ratio(pages, zero, level, data)
        if ratio is None:
            return False
        nbytes = PAGE_SIZE * (len(zero) - int(zero.sum()))
        return record_length(len(zero), int(nbytes / ratio)) >= plain_length(len(zero))

    def encode(self, pfns: np.ndarray, pages: np.ndarray | None, level: int | None = None,
               zero: np.ndarray | None = None, data: np.ndarray | None = None) -> Encoded:
        """One batch at `level` (default: self.level); plain PAGE_DATA if its sample or its frame
        says that is not longer. `zero`: the batch's zero_pages, if the caller has tested them
        already; `data`: its data pages, if the caller has copied them out already (a snapshot;
        `pages` is then unused)."""
        level = self.level if level is None else level
        if zero is None:
            zero = zero_pages(pages)
        if self.sample_says_plain(pages, zero, level, data):
            return PlainPages().encode(pfns, pages if data is None else snapshot_frames(zero, data))
        return self.pack(pfns, pages, level, zero, data)

    def pack(self, pfns: np.ndarray, pages: np.ndarray | None, level: int, zero: np.ndarray,
             data: np.ndarray | None = None) -> Encoded:
        """The batch compressed whole (`zero`: its zero_pages; `data` as for encode); plain
        PAGE_DATA if that is not longer."""
        # `pages` may be live guest memory (PageEncoder). Each page is read once for the zero
        # test and once by the boolean index, which copies the data pages out in one pass (also
        # when none is zero): zstd and its checksum read only that snapshot. A page written
        # between the two reads is dirty, and is resent whichever way it went this time.
        copied = data is not None
        if data is None:
            data = pages[~zero]
        payload = self._compress(data, level) if data.size else b""
        bitmap = np.packbits(zero, bitorder="little").tobytes()
        head = struct.pack(HEADER_FORMAT, len(pfns), ALGORITHM_ZSTD, 0, int(zero.sum()), len(payload))
        meta = head + pfns.astype("<u8").tobytes() + bitmap + bytes(bitmap_size(len(pfns)) - len(bitmap))
        length = len(meta) + len(payload)
        if length >= plain_length(len(pfns)):
            return PlainPages().encode(pfns, snapshot_frames(zero, data) if copied else pages)
        return Encoded([libxc.record_header(REC_TYPE, length), meta, payload, bytes(libxc.padding(length))],
                       int(zero.sum()))


# Parse ----------------------------------------------------------------------
def check_count_and_algorithm(record: str, count: int, algorithm: int, known: int) -> None:
    """The first two header fields of an in-band page record (this one, DELTA_PAGE_DATA)."""
    if not 0 < count <= libxc.PAGE_DATA_MAX_PFNS:
        raise libxc.StreamError(f"{record} with {count} pfns (1..{libxc.PAGE_DATA_MAX_PFNS})")
    if algorithm != known:
        raise libxc.StreamError(f"{record} algorithm {algorithm} is unknown")


def parse(body: memoryview, npages: int) -> tuple[np.ndarray, np.ndarray, memoryview]:
    """Validate the record; returns (data pfns, zero mask over them, payload)."""
    if len(body) < HEADER_SIZE:
        raise libxc.StreamError(f"COMPRESSED_PAGE_DATA record too short ({len(body)} bytes)")
    count, algorithm, reserved, zero_count, payload_length = struct.unpack_from(HEADER_FORMAT, body)
    check_count_and_algorithm("COMPRESSED_PAGE_DATA", count, algorithm, ALGORITHM_ZSTD)
    if reserved:
        raise libxc.StreamError("COMPRESSED_PAGE_DATA reserved field is not zero")
    meta_length = HEADER_SIZE + 8 * count + bitmap_size(count)
    if len(body) != meta_length + payload_length:
        raise libxc.StreamError(f"COMPRESSED_PAGE_DATA length {len(body)} does not match its header "
                                f"({meta_length} + {payload_length})")
    entries = np.frombuffer(body, dtype="<u8", count=count, offset=HEADER_SIZE)
    bits = np.unpackbits(np.frombuffer(body, dtype=np.uint8, count=(count + 7) // 8,
                                       offset=HEADER_SIZE + 8 * count), bitorder="little")
    if bits[count:].any():
        raise libxc.StreamError("COMPRESSED_PAGE_DATA bitmap has bits beyond its count")
    zero_all = bits[:count].astype(bool)
    if any(body[HEADER_SIZE + 8 * count + (count + 7) // 8:meta_length]):
        raise libxc.StreamError("COMPRESSED_PAGE_DATA bitmap padding is not zero")
    types = entries >> np.uint64(libxc.PFN_TYPE_SHIFT)
    carries = ~np.isin(types.astype(np.uint8), list(libxc.PFINFO_NO_DATA))
    if np.any(zero_all & ~carries):
        raise libxc.StreamError("COMPRESSED_PAGE_DATA marks a no-data pfn as a zero page")
    if int(zero_all.sum()) != zero_count:
        raise libxc.StreamError(f"COMPRESSED_PAGE_DATA zero_count {zero_count} does not match its bitmap")
    data_pages = int(carries.sum())
    expected = PAGE_SIZE * (data_pages - zero_count)
    pd = libxc.check_pfn_entries(entries, PAGE_SIZE * data_pages, npages, meta_length)
    payload = body[meta_length:]
    if expected == 0 and payload_length:
        raise libxc.StreamError("COMPRESSED_PAGE_DATA has a payload but no pages to fill")
    return pd.pfns, zero_all[carries], payload


ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
MAX_WINDOW = libxc.PAGE_DATA_MAX_PFNS * PAGE_SIZE     # 4 MiB: a record's pages, and never more


ZSTD_BLOCK_RLE = 1                                 # its content is one byte, whatever its size says
ZSTD_CHECKSUM_SIZE = 4
ZSTD_BLOCK_HEADER_SIZE = 3
# A sender's frame of 1024 pages has 33 blocks (128 KiB each); one with many more (empty blocks are
# valid) is measured by the decoder itself, on inflate's way, rather than walked here block by block.
MAX_WALKED_BLOCKS = 256


def check_frame(payload: memoryview, expected: int, record: str = "COMPRESSED_PAGE_DATA") -> None:
    """The rules a frame meets before anything inflates: it must declare its size, carry a
    content checksum (so a record that is not what the sender compressed fails the restore
    instead of writing wrong pages) and need no dictionary and no window beyond MAX_WINDOW.
    `record` names the record in the errors (DELTA_PAGE_DATA's frames follow the same rules)."""
    if bytes(payload[:4]) != ZSTD_MAGIC:
        raise libxc.StreamError(f"{record} payload is not a zstd frame (skippable frames are refused)")
    try:
        params = zstandard.get_frame_parameters(payload)
    except zstandard.ZstdError as e:
        raise libxc.StreamError(f"{record} payload is not a zstd frame: {e}") from None
    if params.content_size == zstandard.CONTENTSIZE_UNKNOWN:
        raise libxc.StreamError(f"{record} frame does not declare its content size")
    if params.content_size != expected:
        raise libxc.StreamError(f"{record} frame claims {params.content_size} bytes, "
                                f"its pfns need {expected}")
    if not params.has_checksum:
        raise libxc.StreamError(f"{record} frame has no content checksum")
    if params.dict_id:
        raise libxc.StreamError(f"{record} frame needs dictionary {params.dict_id}")
    if params.window_size > MAX_WINDOW:
        raise libxc.StreamError(f"{record} frame window {params.window_size} bytes "
                                f"exceeds {MAX_WINDOW}")


def frame_length(payload: memoryview, max_blocks: int) -> int | None:
    """The bytes of the frame that starts the payload, from its block headers (zstd's
    ZSTD_findFrameCompressedSize: the streaming decoder stops at the frame's end and would not
    notice bytes after it), or None past `max_blocks` blocks. Only for a frame check_frame passed."""
    at = zstandard.frame_header_size(payload)
    for _ in range(max_blocks):
        if at + ZSTD_BLOCK_HEADER_SIZE > len(payload):
            return None                  # truncated: the decoder says how
        header = int.from_bytes(payload[at:at + ZSTD_BLOCK_HEADER_SIZE], "little")
        last, kind, size = header & 1, (header >> 1) & 3, header >> 3
        at += ZSTD_BLOCK_HEADER_SIZE + (1 if kind == ZSTD_BLOCK_RLE else size)
        if last:
            return at + ZSTD_CHECKSUM_SIZE
    return None


_local = threading.local()      # a zstd context is not thread-safe: one per thread


def _decompressor() -> zstandard.ZstdDecompressor:
    dctx = getattr(_local, "dctx", None)
    if dctx is None:
        dctx = _local.dctx = zstandard.ZstdDecompressor(max_window_size=MAX_WINDOW)
    return dctx


def _inflate_error(e: zstandard.ZstdError, record: str = "COMPRESSED_PAGE_DATA") -> libxc.StreamError:
    if "checksum" in str(e):
        return libxc.StreamError(f"{record} checksum mismatch: the record's pages are not "
                                 "what its sender compressed")
    return libxc.StreamError(f"{record} payload does not inflate: {e}")


def inflate(payload: memoryview, expected: int, record: str = "COMPRESSED_PAGE_DATA") -> bytes:
    """Decompress one frame to exactly `expected` bytes, never allocating more (check_frame's rules)."""
    check_frame(payload, expected, record)
    try:
        out = _decompressor().decompress(payload, max_output_size=expected, allow_extra_data=False)
    except zstandard.ZstdError as e:
        raise _inflate_error(e, record) from None
    if len(out) != expected:
        raise libxc.StreamError(f"{record} inflates to {len(out)} bytes, its pfns need {expected}")
    return out


def inflate_into(payload: memoryview, outputs: list[memoryview], record: str = "COMPRESSED_PAGE_DATA") -> None:
    """Decompress one frame straight into `outputs`, in order (guest memory, or a scratch buffer):
    the same rules and errors as inflate, without an output buffer of its own. A frame that
    fails its checksum has already written the outputs: the caller's domain is one that fails."""
    expected = sum(len(out) for out in outputs)
    check_frame(payload, expected, record)
    if frame_length(payload, MAX_WALKED_BLOCKS) != len(payload):    # odd, hostile or truncated: the strict way
        inflated, at = memoryview(inflate(payload, expected, record)), 0
        for out in outputs:
            out[:] = inflated[at:at + len(out)]
            at += len(out)
        return
    try:
        reader = _decompressor().stream_reader(payload, read_across_frames=False)
        for out in outputs:
            got = 0
            while got < len(out):
                n = reader.readinto(out[got:])
                if not n:
                    raise libxc.StreamError(f"{record} payload does not inflate: "
                                            "the frame ends before its content size")
                got += n
        if reader.readinto(bytearray(1)):        # reaches the frame's end: checks the checksum
            raise libxc.StreamError(f"{record} inflates to more than its pfns need")
    except zstandard.ZstdError as e:
        raise _inflate_error(e, record) from None


def decode_frames(body: memoryview | bytes, npages: int) -> tuple[np.ndarray, np.ndarray]:
    """The record's pfns and their 4096-byte frames (zero pages as zeros); thread-safe."""
    pfns, zero, payload = parse(memoryview(body), npages)
    frames = np.zeros((pfns.size, PAGE_SIZE), dtype=np.uint8)
    nonzero = int((~zero).sum())
    if nonzero:
        frames[~zero] = np.frombuffer(inflate(payload, PAGE_SIZE * nonzero), dtype=np.uint8).reshape(-1, PAGE_SIZE)
    return pfns, frames
