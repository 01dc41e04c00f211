"""DELTA_PAGE_DATA (0x14): re-sent pages as XOR deltas against the page the receiver holds.

Mandatory (an old receiver must fail, not drop memory). A page the guest rewrote in a few bytes
since it was last sent XORs with that copy to mostly zero bytes, which zstd shrinks to almost
nothing. The receiver holds the base already (it wrote it earlier in the same stream); a crc32 of
the base and of the result per page catch a base that is not what the sender meant, and a delta
applied to the wrong page. Full description: docs/delta-page-data.md.

Body (little-endian):
    0   u32  count            pfn entries, 1..1024, each of a data-carrying type, each pfn once
    4   u16  algorithm        1 = XOR with the base, then zstd
    6   u16  reserved         zero
    8   u32  payload_length   bytes of the zstd frame
    12  u32  reserved         zero
    16  count x u64           pfn entries, encoded as in PAGE_DATA
    ..  count x u32           crc32 of each entry's base: the page the receiver must hold
    ..  count x u32           crc32 of each entry's result: the page once the delta is applied,
                              then zero padding to a multiple of 8 bytes
    ..  payload               one zstd frame of exactly 4096 x count bytes, each new page XOR its
                              base in entry order; the frame rules of COMPRESSED_PAGE_DATA
                              (content size, content checksum, no dictionary, window <= 4 MiB)
"""
from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from typing import Callable

import numpy as np

from xenemu.memory import PAGE_SIZE

from . import compressed, libxc

REC_TYPE = libxc.REC_TYPE_DELTA_PAGE_DATA
NAME = "DELTA_PAGE_DATA"
HEADER_FORMAT = "<IHHII"                           # count, algorithm, reserved, payload_length, reserved
HEADER_SIZE = struct.calcsize(HEADER_FORMAT)       # 16
ALGORITHM_XOR_ZSTD = 1
CRC_DTYPE = "<u4"
# Set (to anything) in a restoring xenguest's environment: it refuses these records as a xenguest
# from before them does (an older host that accepts COMPRESSED_PAGE_DATA but not deltas).
REFUSE_ENV = "XENGUEST_REFUSE_DELTA"


def meta_size(count: int) -> int:
    """Header, pfn entries and both crc arrays, padded to 8 bytes."""
    return HEADER_SIZE + 8 * count + ((8 * count + 7) & ~7)


def crc32s(pages: np.ndarray) -> np.ndarray:
    """The crc32 of each 4096-byte row."""
    return np.fromiter((zlib.crc32(page) for page in pages), dtype=CRC_DTYPE, count=len(pages))


ZERO_PAGE_CRC = zlib.crc32(bytes(PAGE_SIZE))


# Build ----------------------------------------------------------------------
def build(pfns: np.ndarray, news: np.ndarray, bases: np.ndarray,
          compress: Callable[[np.ndarray], bytes]) -> tuple[list, np.ndarray]:
    """The record (buffers for writev) of `news` against `bases` (snapshots, never live memory:
    each is read here more than once), and the result crcs (what the cache's entries now are).
    `compress` turns bytes into one zstd frame with content size and checksum."""
    count = len(pfns)
    if not 0 < count <= libxc.PAGE_DATA_MAX_PFNS:
        raise ValueError(f"{NAME} carries 1..{libxc.PAGE_DATA_MAX_PFNS} pfns, not {count}")
    results = crc32s(news)
    payload = compress(np.bitwise_xor(news, bases))
    meta = b"".join((struct.pack(HEADER_FORMAT, count, ALGORITHM_XOR_ZSTD, 0, len(payload), 0),
                     pfns.astype("<u8").tobytes(), crc32s(bases).tobytes(), results.tobytes()))
    meta += bytes(meta_size(count) - len(meta))
    length = len(meta) + len(payload)
    return [libxc.record_header(REC_TYPE, length), meta, payload, bytes(libxc.padding(length))], results


# Parse ----------------------------------------------------------------------
@dataclass
class DeltaRecord:
    pfns: np.ndarray            # uint64, in entry order
    base_crcs: np.ndarray       # uint32 each
    result_crcs: np.ndarray
    payload: memoryview


def parse(body: memoryview, npages: int) -> DeltaRecord:
    """Validate the record's layout against a domain of `npages` pages (not its frame: apply)."""
    if len(body) < HEADER_SIZE:
        raise libxc.StreamError(f"{NAME} record too short ({len(body)} bytes)")
    count, algorithm, reserved, payload_length, reserved2 = struct.unpack_from(HEADER_FORMAT, body)
    compressed.check_count_and_algorithm(NAME, count, algorithm, ALGORITHM_XOR_ZSTD)
    if reserved or reserved2:
        raise libxc.StreamError(f"{NAME} reserved field is not zero")
    meta = meta_size(count)
    if len(body) != meta + payload_length:
        raise libxc.StreamError(f"{NAME} length {len(body)} does not match its header ({meta} + {payload_length})")
    if any(body[HEADER_SIZE + 16 * count:meta]):
        raise libxc.StreamError(f"{NAME} crc padding is not zero")
    entries = np.frombuffer(body, dtype="<u8", count=count, offset=HEADER_SIZE)
    types = (entries >> np.uint64(libxc.PFN_TYPE_SHIFT)).astype(np.uint8)
    if np.isin(types, list(libxc.PFINFO_NO_DATA)).any():
        raise libxc.StreamError(f"{NAME} entry of a type that carries no data")
    pfns = libxc.check_pfn_entries(entries, PAGE_SIZE * count, npages, meta).pfns
    if np.unique(pfns).size != count:
        raise libxc.StreamError(f"{NAME} names a pfn twice")
    crcs = np.frombuffer(body, dtype=CRC_DTYPE, count=2 * count, offset=HEADER_SIZE + 8 * count)
    return DeltaRecord(pfns, crcs[:count], crcs[count:], body[meta:])


def _check(record: DeltaRecord, crcs: np.ndarray, expected: np.ndarray, what: str) -> None:
    wrong = np.flatnonzero(crcs != expected)
    if not wrong.size:
        return
    i = int(wrong[0])
    pfn = int(record.pfns[i])
    if what == "base":
        raise libxc.StreamError(f"{NAME} base of pfn 0x{pfn:x} has crc32 {int(crcs[i]):08x}, "
                                f"the record expects {int(expected[i]):08x}: "
                                f"the receiver does not hold what the sender sent")
    raise libxc.StreamError(f"{NAME} result of pfn 0x{pfn:x} fails its crc32")


def apply_into(record: DeltaRecord, bases: np.ndarray, out: np.ndarray) -> np.ndarray:
    """The new pages, in `out` (a reused scratch of at least the record's rows, not `bases`):
    `bases` (what the receiver holds for record.pfns, one row each) checked against the base
    crcs, XORed in place with the deltas inflated into `out`, the results checked against theirs.
    No buffer is allocated per record: the receiver applies deltas at memory speed."""
    results = out[:len(record.pfns)]
    _check(record, crc32s(bases), record.base_crcs, "base")
    compressed.inflate_into(record.payload, [memoryview(results).cast("B")], NAME)
    np.bitwise_xor(results, bases, out=results)
    _check(record, crc32s(results), record.result_crcs, "result")
    return results


def apply(record: DeltaRecord, bases: np.ndarray) -> np.ndarray:
    """apply_into a fresh array (convert, tests)."""
    return apply_into(record, bases, np.empty((len(record.pfns), PAGE_SIZE), dtype=np.uint8))
