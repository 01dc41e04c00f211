#!/usr/bin/env python3
"""Independent format checker for libxc migration streams (v2 and v3), and the suspend image around them.

Written from the facts in Xen's ``docs/specs/libxc-migration-stream.pandoc``,
the rules of ``tools/python/scripts/verify-stream-v2`` (record checks in
``tools/python/xen/migration/libxc.py``) and the restorer in
``tools/libs/guest/xg_sr_*.c``.  It imports nothing from the project on
purpose: a misreading of the format shared by writer and reader cannot hide
from a checker that was written separately.

Only uncompressed, little-endian streams are accepted, as Xen's own tools do.
With ``inband`` it also reads this project's two mandatory extensions, from
their documents (docs/compressed-page-data.md, docs/delta-page-data.md), not
its code: COMPRESSED_PAGE_DATA (0x13) and DELTA_PAGE_DATA (0x14). It then
holds every page the stream sends, so that each delta's base and result crcs
are checked against the page a receiver would hold.
"""

from __future__ import annotations

import argparse
import mmap
import re
import struct
import sys
import zlib
from collections import Counter
from typing import Any, Union

import zstandard

Buffer = Union[bytes, bytearray, memoryview, mmap.mmap]

IHDR = struct.Struct("!QIIHHI")  # image header: always big-endian, 24 bytes
DHDR = struct.Struct("<IHHII")   # domain header, 16 bytes
RHDR = struct.Struct("<II")      # record header: type, body_length
U32X2 = struct.Struct("<II")
TSC_INFO = struct.Struct("<IIQII")  # mode, khz, nsec, incarnation, reserved

IHDR_MARKER = 0xFFFFFFFFFFFFFFFF
IHDR_ID = 0x58454E46  # "XENF"
VERSIONS = (2, 3)
OPT_BIG_ENDIAN = 0x0001
OPT_RESERVED = 0xFFFE

DOMAIN_TYPES = {1: "x86 PV", 2: "x86 HVM"}  # the only types libxc.py knows
DT_PV, DT_HVM = 1, 2
PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT

REC_ALIGN = 8
REC_LENGTH_MAX = 128 << 20  # restorer refuses longer records
REC_OPTIONAL = 0x80000000

REC_NAMES = {
    0x00: "END",
    0x01: "PAGE_DATA",
    0x02: "X86_PV_INFO",
    0x03: "X86_PV_P2M_FRAMES",
    0x04: "X86_PV_VCPU_BASIC",
    0x05: "X86_PV_VCPU_EXTENDED",
    0x06: "X86_PV_VCPU_XSAVE",
    0x07: "SHARED_INFO",
    0x08: "X86_TSC_INFO",
    0x09: "HVM_CONTEXT",
    0x0A: "HVM_PARAMS",
    0x0B: "TOOLSTACK",
    0x0C: "X86_PV_VCPU_MSRS",
    0x0D: "VERIFY",
    0x0E: "CHECKPOINT",
    0x0F: "CHECKPOINT_DIRTY_PFN_LIST",
    0x10: "STATIC_DATA_END",
    0x11: "X86_CPUID_POLICY",
    0x12: "X86_MSR_POLICY",
}
(END, PAGE_DATA, PV_INFO, PV_P2M, PV_BASIC, PV_EXT, PV_XSAVE, SHARED_INFO,
 TSC, HVM_CONTEXT, HVM_PARAMS, TOOLSTACK, PV_MSRS, VERIFY, CHECKPOINT,
 DIRTY_PFN_LIST, STATIC_DATA_END, CPUID_POLICY, MSR_POLICY) = range(0x13)

# This project's extensions (read only with `inband`).
COMPRESSED_PAGE_DATA, DELTA_PAGE_DATA = 0x13, 0x14
INBAND_NAMES = {COMPRESSED_PAGE_DATA: "COMPRESSED_PAGE_DATA", DELTA_PAGE_DATA: "DELTA_PAGE_DATA"}
INBAND_HEADER = struct.Struct("<IHHII")  # both: count, algorithm, reserved, then two u32
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
MAX_WINDOW = 4 << 20

PV_ONLY = {PV_INFO, PV_P2M, PV_BASIC, PV_EXT, PV_XSAVE, SHARED_INFO, PV_MSRS}
HVM_ONLY = {HVM_CONTEXT, HVM_PARAMS}
V3_ONLY = {STATIC_DATA_END, CPUID_POLICY, MSR_POLICY}
ZERO_LENGTH = {END, VERIFY, CHECKPOINT, STATIC_DATA_END}
# The restorer needs STATIC_DATA_END (sent or, in v2, inferred) before these.
NEEDS_STATIC_END = {PAGE_DATA, PV_P2M, COMPRESSED_PAGE_DATA, DELTA_PAGE_DATA}

# PAGE_DATA pfn word: bits 63-60 type, 59-52 reserved, 51-0 pfn.
PFN_TYPE_SHIFT = 60
PFN_RESERVED_MASK = 0x0FF0000000000000
PFN_TYPES_INVALID = range(5, 9)         # 0x5-0x8 are reserved page types
PFN_TYPES_NO_DATA = {0xD, 0xE, 0xF}     # BROKEN, XALLOC, XTAB
MAX_BATCH_PFNS = 1024                   # saver's MAX_BATCH_SIZE

CPUID_LEAF_SIZE = 24  # xen_cpuid_leaf_t: leaf, subleaf, a, b, c, d (u32 each)
MSR_ENTRY_SIZE = 16   # xen_msr_entry_t: idx u32, flags u32, val u64
HVM_PARAM_SIZE = 16   # index u64, value u64


class StreamCheckError(Exception):
    """A libxc stream rule is broken; ``offset`` is where, in ``data``."""

    def __init__(self, offset: int, message: str) -> None:
        super().__init__(f"offset {offset} (0x{offset:x}): {message}")
        self.offset = offset


def record_name(rtype: int) -> str:
    """Spec name of a record type, or a descriptive placeholder."""
    if rtype in REC_NAMES:
        return REC_NAMES[rtype]
    kind = "OPTIONAL" if rtype & REC_OPTIONAL else "UNKNOWN"
    return f"{kind}_0x{rtype:08x}"


class _Checker:
    """One pass over a stream; keeps the ordering state between records."""

    def __init__(self, data: Buffer, start: int, hvm_expected: bool,
                 allow_optional: bool, allow_trailing: bool, inband: bool = False) -> None:
        self.data = data
        self.start = start
        self.end = len(data)
        self.hvm_expected = hvm_expected
        self.allow_optional = allow_optional
        self.allow_trailing = allow_trailing
        self.version = 0
        self.domain_type = 0
        self.xen_version = (0, 0)
        self.records: list[tuple[str, int]] = []
        self.pages = 0
        self.page_records = 0
        self.seen_static_end = False
        self.seen_hvm_context = False
        self.context_in_checkpoint = False  # HVM_CONTEXT since last CHECKPOINT
        self.names = {**REC_NAMES, **INBAND_NAMES} if inband else REC_NAMES
        self.held: dict[int, bytes] | None = {} if inband else None  # pfn -> the page last sent
        self.delta_records = 0

    # -- helpers ---------------------------------------------------------
    def need(self, off: int, size: int, what: str) -> None:
        """Fail as truncated unless ``size`` bytes are available at ``off``."""
        left = self.end - off
        if left < size:
            raise StreamCheckError(
                off, f"truncated {what}: need {size} bytes, only {left} left")

    # -- headers ---------------------------------------------------------
    def image_header(self, off: int) -> None:
        """Image header rules (spec 'Image Header', libxc.py verify_ihdr)."""
        self.need(off, IHDR.size, "image header")
        marker, ident, version, options, res1, res2 = IHDR.unpack_from(self.data, off)
        if marker != IHDR_MARKER:
            raise StreamCheckError(off, f"bad image marker 0x{marker:016x}, "
                                        f"expected 0x{IHDR_MARKER:016x}")
        if ident != IHDR_ID:
            raise StreamCheckError(off + 8, f"bad image id 0x{ident:08x}, "
                                            f"expected 0x{IHDR_ID:08x} ('XENF')")
        if version not in VERSIONS:
            raise StreamCheckError(off + 12, f"unsupported image version {version}, "
                                             f"expected one of {VERSIONS}")
        if options & OPT_RESERVED:
            raise StreamCheckError(off + 16, "reserved bits set in image header "
                                             f"options: 0x{options & OPT_RESERVED:04x}")
        if options & OPT_BIG_ENDIAN:
            raise StreamCheckError(off + 16, "image header options declare a "
                                             "big-endian stream; Xen restores only "
                                             "little-endian streams")
        if res1 or res2:
            raise StreamCheckError(off + 18, "reserved image header fields not zero: "
                                             f"0x{res1:04x}:0x{res2:08x}")
        self.version = version

    def domain_header(self, off: int) -> None:
        """Domain header rules (spec 'Domain Header', libxc.py verify_dhdr)."""
        self.need(off, DHDR.size, "domain header")
        dtype, page_shift, res1, major, minor = DHDR.unpack_from(self.data, off)
        if dtype not in DOMAIN_TYPES:
            raise StreamCheckError(off, f"unrecognised domain type 0x{dtype:x}")
        if self.hvm_expected and dtype != DT_HVM:
            raise StreamCheckError(off, f"domain type {dtype} ({DOMAIN_TYPES[dtype]})"
                                        ", expected 2 (x86 HVM)")
        if page_shift != PAGE_SHIFT:
            raise StreamCheckError(off + 4, f"page_shift {page_shift}, expected "
                                            f"{PAGE_SHIFT}")
        if res1:
            raise StreamCheckError(off + 6, f"reserved domain header field not zero: "
                                            f"0x{res1:04x}")
        self.domain_type = dtype
        self.xen_version = (major, minor)

    # -- records ---------------------------------------------------------
    def records_from(self, off: int) -> int:
        """Walk records until END; return the offset just past END."""
        while True:
            if off == self.end:
                raise StreamCheckError(off, f"missing END record: stream ends after "
                                            f"{len(self.records)} records")
            self.need(off, RHDR.size, "record header")
            rtype, length = RHDR.unpack_from(self.data, off)
            name = self.names.get(rtype) or record_name(rtype)
            if rtype not in self.names:
                if not rtype & REC_OPTIONAL:
                    raise StreamCheckError(off, f"unknown mandatory record type "
                                                f"0x{rtype:08x}")
                if not self.allow_optional:
                    raise StreamCheckError(off, f"optional record type 0x{rtype:08x} "
                                                "is unknown to verify-stream-v2")
            if length > REC_LENGTH_MAX:
                raise StreamCheckError(off + 4, f"{name} body_length {length} exceeds "
                                                f"the maximum {REC_LENGTH_MAX}")
            body = off + RHDR.size
            padded = (length + REC_ALIGN - 1) & ~(REC_ALIGN - 1)
            self.need(body, padded, f"{name} record (body_length {length}, "
                                    f"{padded} bytes with padding)")
            padding = bytes(self.data[body + length:body + padded])
            if any(padding):
                raise StreamCheckError(body + length, f"non-zero padding after {name} "
                                                      f"body: {padding.hex()} (record "
                                                      "not padded to 8 bytes?)")
            self.order(off, rtype, name)
            if rtype in INBAND_NAMES and self.held is not None:
                self.inband(body, rtype, name, length)
            elif rtype in REC_NAMES:
                self.body(body, rtype, name, length)
            self.records.append((name, length))
            off = body + padded
            if rtype == END:
                return off

    def order(self, off: int, rtype: int, name: str) -> None:
        """Placement rules: v3-only records, STATIC_DATA_END, domain type."""
        if rtype in V3_ONLY and self.version < 3:
            raise StreamCheckError(off, f"{name} record in a v{self.version} stream "
                                        "(v3 only)")
        if self.domain_type == DT_HVM and rtype in PV_ONLY:
            raise StreamCheckError(off, f"x86 PV record {name} in an x86 HVM stream")
        if self.domain_type == DT_PV and rtype in HVM_ONLY:
            raise StreamCheckError(off, f"HVM record {name} in an x86 PV stream")
        if rtype in NEEDS_STATIC_END and not self.seen_static_end:
            if self.version >= 3:
                raise StreamCheckError(off, f"{name} before STATIC_DATA_END "
                                            "(v3 requires STATIC_DATA_END first)")
            self.seen_static_end = True  # v2: the restorer infers it here
        if rtype in (CPUID_POLICY, MSR_POLICY) and self.seen_static_end:
            raise StreamCheckError(off, f"{name} after STATIC_DATA_END "
                                        "(CPU policy is static data)")
        if rtype == STATIC_DATA_END and self.seen_static_end:
            raise StreamCheckError(off, "multiple STATIC_DATA_END records")
        if rtype == HVM_PARAMS and self.context_in_checkpoint:
            raise StreamCheckError(off, "HVM_PARAMS after HVM_CONTEXT "
                                        "(spec: HVM_PARAMS must precede HVM_CONTEXT)")
        if rtype == END:
            if self.version >= 3 and not self.seen_static_end:
                raise StreamCheckError(off, "END without STATIC_DATA_END "
                                            "(mandatory in v3 streams)")
            if self.domain_type == DT_HVM and not self.seen_hvm_context:
                raise StreamCheckError(off, "END without any HVM_CONTEXT record "
                                            "in an x86 HVM stream")

    def body(self, off: int, rtype: int, name: str, length: int) -> None:
        """Per-record body rules (libxc.py record verifiers, restorer handlers)."""
        data = self.data
        if rtype in ZERO_LENGTH:
            if length:
                raise StreamCheckError(off - 4, f"{name} body_length {length}, must be 0")
            if rtype == STATIC_DATA_END:
                self.seen_static_end = True
            elif rtype == CHECKPOINT:
                self.context_in_checkpoint = False
        elif rtype == PAGE_DATA:
            self.page_data(off, length)
        elif rtype == PV_INFO:
            if length != 8:
                raise StreamCheckError(off - 4, f"X86_PV_INFO body_length {length}, "
                                                "expected 8")
            width, levels, res1, res2 = struct.unpack_from("<BBHI", data, off)
            if width not in (4, 8) or levels not in (3, 4):
                raise StreamCheckError(off, f"X86_PV_INFO guest_width {width} / "
                                            f"pt_levels {levels} invalid")
            if res1 or res2:
                raise StreamCheckError(off + 2, "X86_PV_INFO reserved bytes not zero")
        elif rtype == PV_P2M:
            if length < 8 or length % 8:
                raise StreamCheckError(off - 4, f"X86_PV_P2M_FRAMES body_length {length}"
                                                ", expected a multiple of 8, >= 8")
        elif rtype in (PV_BASIC, PV_EXT, PV_XSAVE, PV_MSRS):
            if length < 8:
                raise StreamCheckError(off - 4, f"{name} body_length {length}, "
                                                "expected >= 8")
            if U32X2.unpack_from(data, off)[1]:
                raise StreamCheckError(off + 4, f"{name} reserved field not zero")
        elif rtype == SHARED_INFO:
            if length != PAGE_SIZE:
                raise StreamCheckError(off - 4, f"SHARED_INFO body_length {length}, "
                                                f"expected {PAGE_SIZE}")
        elif rtype == TSC:
            if length != TSC_INFO.size:
                raise StreamCheckError(off - 4, f"X86_TSC_INFO body_length {length}, "
                                                f"expected {TSC_INFO.size}")
            if TSC_INFO.unpack_from(data, off)[4]:
                raise StreamCheckError(off + 20, "X86_TSC_INFO reserved field not zero")
        elif rtype == HVM_CONTEXT:
            if length == 0:
                raise StreamCheckError(off - 4, "HVM_CONTEXT body is empty")
            self.seen_hvm_context = self.context_in_checkpoint = True
        elif rtype == HVM_PARAMS:
            if length < 8:
                raise StreamCheckError(off - 4, f"HVM_PARAMS body_length {length}, "
                                                "expected >= 8")
            count, res = U32X2.unpack_from(data, off)
            if res:
                raise StreamCheckError(off + 4, f"HVM_PARAMS reserved field not zero "
                                                f"(0x{res:x})")
            want = 8 + count * HVM_PARAM_SIZE
            if length != want:
                raise StreamCheckError(off - 4, f"HVM_PARAMS body_length {length}, "
                                                f"expected {want} for count {count}")
        elif rtype in (TOOLSTACK, DIRTY_PFN_LIST):
            raise StreamCheckError(off - 8, f"{name} record is not allowed in a "
                                            "stream (deprecated / back-channel only)")
        elif rtype in (CPUID_POLICY, MSR_POLICY):
            unit = CPUID_LEAF_SIZE if rtype == CPUID_POLICY else MSR_ENTRY_SIZE
            if length == 0 or length % unit:
                raise StreamCheckError(off - 4, f"{name} body_length {length}, "
                                                f"expected a non-zero multiple of {unit}")

    def page_data(self, off: int, length: int) -> None:
        """PAGE_DATA: count, reserved, pfn words, then one page per data pfn."""
        if length < 8:
            raise StreamCheckError(off - 4, f"PAGE_DATA body_length {length}, "
                                            "too short for its 8-byte header")
        count, res = U32X2.unpack_from(self.data, off)
        if res:
            raise StreamCheckError(off + 4, f"PAGE_DATA reserved field not zero "
                                            f"(0x{res:x})")
        if count == 0:
            raise StreamCheckError(off, "PAGE_DATA count is 0 (must be > 0)")
        if count > MAX_BATCH_PFNS:
            raise StreamCheckError(off, f"PAGE_DATA count {count} exceeds "
                                        f"{MAX_BATCH_PFNS} pfns per record")
        if length < 8 + 8 * count:
            raise StreamCheckError(off - 4, f"PAGE_DATA body_length {length} too short "
                                            f"for {count} pfn entries")
        with_data = 0
        base = off + 8
        for i, word in enumerate(struct.unpack_from(f"<{count}Q", self.data, base)):
            if word & PFN_RESERVED_MASK:
                raise StreamCheckError(base + 8 * i, f"PAGE_DATA pfn[{i}] 0x{word:016x}"
                                                     " has reserved bits 59-52 set")
            ptype = word >> PFN_TYPE_SHIFT
            if ptype in PFN_TYPES_INVALID:
                raise StreamCheckError(base + 8 * i, f"PAGE_DATA pfn[{i}] has invalid "
                                                     f"page type 0x{ptype:x}")
            if ptype not in PFN_TYPES_NO_DATA:
                with_data += 1
        want = 8 + 8 * count + PAGE_SIZE * with_data
        if length != want:
            raise StreamCheckError(off - 4, f"PAGE_DATA body_length {length}, expected "
                                            f"{want} (8 + 8*{count} pfns + "
                                            f"{PAGE_SIZE}*{with_data} pages)")
        self.pages += with_data
        self.page_records += 1
        if self.held is not None:
            at = base + 8 * count
            for word in struct.unpack_from(f"<{count}Q", self.data, base):
                if word >> PFN_TYPE_SHIFT not in PFN_TYPES_NO_DATA:
                    self.held[word & ((1 << 52) - 1)] = bytes(self.data[at:at + PAGE_SIZE])
                    at += PAGE_SIZE

    # -- this project's records (docs/compressed-page-data.md, docs/delta-page-data.md) --------
    def pfn_words(self, off: int, name: str, count: int) -> list[int]:
        words = list(struct.unpack_from(f"<{count}Q", self.data, off))
        for i, word in enumerate(words):
            if word & PFN_RESERVED_MASK or word >> PFN_TYPE_SHIFT in PFN_TYPES_INVALID:
                raise StreamCheckError(off + 8 * i, f"{name} pfn[{i}] 0x{word:016x} is invalid")
        return words

    def frame(self, off: int, name: str, payload: bytes, size: int) -> bytes:
        """The payload: one zstd frame declaring `size` bytes and a checksum, no dictionary,
        a window of at most 4 MiB, nothing after it."""
        try:
            params = zstandard.get_frame_parameters(payload)
            if payload[:4] != ZSTD_MAGIC or params.content_size != size or not params.has_checksum \
                    or params.dict_id or params.window_size > MAX_WINDOW:
                raise StreamCheckError(off, f"{name} frame breaks the frame rules (size "
                                            f"{params.content_size}, expected {size})")
            out = zstandard.ZstdDecompressor(max_window_size=MAX_WINDOW).decompress(
                payload, max_output_size=size, allow_extra_data=False)
        except zstandard.ZstdError as exc:
            raise StreamCheckError(off, f"{name} frame does not inflate: {exc}") from None
        if len(out) != size:
            raise StreamCheckError(off, f"{name} frame inflates to {len(out)} bytes, expected {size}")
        return out

    def inband(self, off: int, rtype: int, name: str, length: int) -> None:
        assert self.held is not None
        if length < INBAND_HEADER.size:
            raise StreamCheckError(off - 4, f"{name} body_length {length} too short")
        count, algorithm, reserved, third, fourth = INBAND_HEADER.unpack_from(self.data, off)
        if not 0 < count <= MAX_BATCH_PFNS:
            raise StreamCheckError(off, f"{name} count {count} outside 1..{MAX_BATCH_PFNS}")
        if algorithm != 1:
            raise StreamCheckError(off + 4, f"{name} algorithm {algorithm} is not 1")
        words = self.pfn_words(off + 16, name, count)
        pfns = [w & ((1 << 52) - 1) for w in words]
        data_entries = [i for i, w in enumerate(words) if w >> PFN_TYPE_SHIFT not in PFN_TYPES_NO_DATA]
        if rtype == COMPRESSED_PAGE_DATA:
            zero_count, payload_length = third, fourth
            bitmap = ((count + 7) // 8 + 7) & ~7
            meta = 16 + 8 * count + bitmap
            if reserved or length != meta + payload_length:
                raise StreamCheckError(off - 4, f"{name} length {length} or reserved field wrong")
            bits = int.from_bytes(bytes(self.data[off + 16 + 8 * count:off + meta]), "little")
            zero = [bool(bits >> i & 1) for i in range(count)]
            if bits >> count or sum(zero) != zero_count or any(zero[i] for i in set(range(count)) - set(data_entries)):
                raise StreamCheckError(off + 16 + 8 * count, f"{name} zero-page bitmap is inconsistent")
            with_data = [i for i in data_entries if not zero[i]]
            payload = bytes(self.data[off + meta:off + length])
            pages = self.frame(off + meta, name, payload, PAGE_SIZE * len(with_data)) if with_data else b""
            if not with_data and payload:
                raise StreamCheckError(off + meta, f"{name} has a payload but no pages")
            for i in data_entries:
                self.held[pfns[i]] = bytes(PAGE_SIZE)
            for n, i in enumerate(with_data):
                self.held[pfns[i]] = pages[PAGE_SIZE * n:PAGE_SIZE * (n + 1)]
            self.pages += len(data_entries)
            self.page_records += 1
            return
        payload_length, reserved2 = third, fourth
        meta = 16 + 8 * count + ((8 * count + 7) & ~7)
        if reserved or reserved2 or length != meta + payload_length or any(self.data[off + 16 + 16 * count:off + meta]):
            raise StreamCheckError(off - 4, f"{name} length {length}, reserved field or padding wrong")
        if len(data_entries) != count or len(set(pfns)) != count:
            raise StreamCheckError(off + 16, f"{name} has an entry without data, or a pfn twice")
        crcs = struct.unpack_from(f"<{2 * count}I", self.data, off + 16 + 8 * count)
        deltas = self.frame(off + meta, name, bytes(self.data[off + meta:off + length]), PAGE_SIZE * count)
        for i, pfn in enumerate(pfns):
            base = self.held.get(pfn)
            if base is None:
                raise StreamCheckError(off + 16 + 8 * i, f"{name} pfn 0x{pfn:x} has no base in the stream")
            if zlib.crc32(base) != crcs[i]:
                raise StreamCheckError(off + 16 + 8 * count + 4 * i, f"{name} pfn 0x{pfn:x}: base crc32 mismatch")
            delta = int.from_bytes(deltas[PAGE_SIZE * i:PAGE_SIZE * (i + 1)], "little")
            result = (int.from_bytes(base, "little") ^ delta).to_bytes(PAGE_SIZE, "little")
            if zlib.crc32(result) != crcs[count + i]:
                raise StreamCheckError(off + 16 + 12 * count + 4 * i, f"{name} pfn 0x{pfn:x}: result crc32 mismatch")
            self.held[pfn] = result
        self.pages += count
        self.page_records += 1
        self.delta_records += 1

    def run(self) -> dict[str, Any]:
        """Check headers, records and what follows END; return the summary."""
        if not 0 <= self.start <= self.end:
            raise StreamCheckError(self.start, f"start offset outside data of "
                                               f"{self.end} bytes")
        self.image_header(self.start)
        self.domain_header(self.start + IHDR.size)
        stop = self.records_from(self.start + IHDR.size + DHDR.size)
        if stop != self.end and not self.allow_trailing:
            raise StreamCheckError(stop, f"{self.end - stop} bytes of data after "
                                         "END record")
        return {
            "version": self.version,
            "domain_type": self.domain_type,
            "xen_version": self.xen_version,
            "records": self.records,
            "pages": self.pages,
            "page_records": self.page_records,
            "end_seen": True,
            "length": stop - self.start,
            "delta_records": self.delta_records,
        }


def check_stream(data: Buffer, *, hvm_expected: bool = True,
                 allow_optional: bool = False, allow_trailing: bool = False,
                 offset: int = 0, inband: bool = False) -> dict[str, Any]:
    """Check a complete libxc stream held in memory, starting at ``offset``.

    Raises StreamCheckError on the first violation.  ``hvm_expected`` demands
    an x86 HVM domain; otherwise x86 PV is accepted too.  Optional records
    (type bit 31) are refused by default because verify-stream-v2 refuses
    them; bytes after END are refused unless ``allow_trailing``; ``inband``
    reads this project's COMPRESSED_PAGE_DATA and DELTA_PAGE_DATA records.
    """
    return _Checker(data, offset, hvm_expected, allow_optional,
                    allow_trailing, inband).run()


def check_file(path: str, offset: int = 0, **kwargs: Any) -> dict[str, Any]:
    """Check the libxc stream stored in ``path`` from byte ``offset``.

    The file is mapped, not read, so large streams cost no copy; the checker
    never keeps views of the map, so it can always be closed.
    """
    with open(path, "rb") as f:
        try:
            mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError:  # empty file cannot be mapped
            return check_stream(b"", offset=offset, **kwargs)
        with mapped:
            return check_stream(mapped, offset=offset, **kwargs)


# -- suspend images (xenopsd's framing around the stream) ------------------
# From xen-api ocaml/xenopsd/lib/suspend_image.ml (header numbers, the
# Xenops_record fields) and xc/domain.ml `suspend` (what it writes, in which
# order), and sexplib0's machine printer (sexp.ml to_buffer_mach, must_escape,
# escaped), all read separately from the project's xenmig/image.py and xenmig/sexp.py.
SAVE_SIGNATURE = b"XenSavedDomv2-\n"
IMAGE_HDR = struct.Struct("<qq")    # type, length: little-endian int64 each
IMAGE_HEADERS = {0x000F: "Xenops", 0x00F0: "Libxc", 0x00F1: "Libxl", 0x00F2: "Libxc_legacy",
                 0x0F00: "Qemu_trad", 0x0F01: "Qemu_xen", 0x0F10: "Demu", 0x0F11: "Varstored",
                 0x0F12: "Swtpm0", 0x0F13: "Swtpm", 0xFFFF: "End_of_image"}
# What `suspend` writes on the main fd of an HVM domain, in order (Varstored
# and Swtpm only for UEFI guests); the vGPU's Demu goes on its own fd.
MAIN_FD_ORDER = ["Xenops", "Libxc", "Varstored", "Swtpm", "Qemu_trad", "End_of_image"]
QEMU_RECORD_MAX = 1 << 20           # consume_qemu_record's limit
# ppx_sexp_conv prints the record's fields in declaration order, an absent
# [@sexp.option] leaves its field out; suspend writes xs_subtree = [] always.
XENOPS_RECORD = re.compile(
    rb'\(\(time (?P<time>[0-9]{8}T[0-9]{2}:[0-9]{2}:[0-9]{2}Z)\)'
    rb'\(word_size (?P<word_size>[0-9]+)\)'
    rb'(?:\(vm_str(?: (?P<bare>[^\x00-\x20\x7f-\xff"();\\]+)|"(?P<quoted>(?:[^"\\]|\\.)*)")\))?'
    rb'\(xs_subtree\(\)\)\)', re.S)


def _sexp_escape(text: bytes) -> bytes:
    """sexplib0's `escaped`: six characters get a letter escape, printable ASCII stays, the rest \\ddd."""
    letters = {0x22: b'\\"', 0x5C: b"\\\\", 0x0A: b"\\n", 0x09: b"\\t", 0x0D: b"\\r", 0x08: b"\\b"}
    return b"".join(letters.get(c) or (bytes([c]) if 0x20 <= c <= 0x7E else b"\\%03d" % c) for c in text)


def _sexp_unescape(quoted: bytes, off: int) -> bytes:
    out, i = bytearray(), 0
    simple = {ord('"'): 0x22, ord("\\"): 0x5C, ord("n"): 0x0A, ord("t"): 0x09, ord("r"): 0x0D, ord("b"): 0x08}
    while i < len(quoted):
        c = quoted[i]
        if c != 0x5C:
            out.append(c)
            i += 1
        elif quoted[i + 1] in simple:
            out.append(simple[quoted[i + 1]])
            i += 2
        elif quoted[i + 1:i + 4].isdigit():
            out.append(int(quoted[i + 1:i + 4]))
            i += 4
        else:
            raise StreamCheckError(off, f"Xenops record: escape {quoted[i:i + 2]!r} the printer never writes")
    return bytes(out)


def check_xenops_record(record: bytes, off: int = 0) -> dict[str, Any]:
    """The record exactly as Sexp.to_string prints suspend's Xenops_record: fields, order, spacing, quoting."""
    m = XENOPS_RECORD.fullmatch(record)
    if m is None:
        raise StreamCheckError(off, f"Xenops record is not the machine-form S-expression of "
                                    f"(time word_size [vm_str] xs_subtree): {record[:80]!r}")
    if int(m["word_size"]) != 64:
        raise StreamCheckError(off, f"Xenops record word_size {m['word_size'].decode()}, expected 64")
    vm_str = m["bare"]
    if m["quoted"] is not None:
        vm_str = _sexp_unescape(m["quoted"], off)
        if _sexp_escape(vm_str) != m["quoted"]:
            raise StreamCheckError(off, "Xenops record: vm_str is not escaped as the printer escapes it")
        if vm_str and not re.search(rb'[\x00-\x20\x7f-\xff"();\\]|#\||\|#', vm_str):
            raise StreamCheckError(off, "Xenops record: vm_str is quoted where the printer leaves it bare")
    return {"time": m["time"].decode(), "word_size": 64, "vm_str": vm_str}


def check_image(data: Buffer, **kwargs: Any) -> dict[str, Any]:
    """A suspend image's main fd as `suspend` writes it: signature, headers in order, the Xenops
    record, the libxc stream (checked by check_stream), the Qemu record, End_of_image, nothing after."""
    if bytes(data[:len(SAVE_SIGNATURE)]) != SAVE_SIGNATURE:
        raise StreamCheckError(0, f"bad suspend image signature {bytes(data[:15])!r}")
    off, headers, xenops, libxc = len(SAVE_SIGNATURE), [], None, None
    while True:
        if len(data) - off < IMAGE_HDR.size:
            raise StreamCheckError(off, "truncated suspend image header")
        htype, length = IMAGE_HDR.unpack_from(data, off)
        name = IMAGE_HEADERS.get(htype)
        if name is None:
            raise StreamCheckError(off, f"unknown suspend image header type 0x{htype:x}")
        rank = MAIN_FD_ORDER.index(name) if name in MAIN_FD_ORDER else -1
        last = MAIN_FD_ORDER.index(headers[-1]) if headers else -1
        if rank < 0 or rank < last or (rank == last and name != "Swtpm"):     # one Swtpm record per vTPM
            raise StreamCheckError(off, f"{name} header after {headers} on the main fd")
        headers.append(name)
        body = off + IMAGE_HDR.size
        if name in ("Libxc", "End_of_image") and length != 0:
            raise StreamCheckError(off, f"{name} header with length {length}, the writer writes 0")
        if name == "Qemu_trad" and length > QEMU_RECORD_MAX:
            raise StreamCheckError(off, f"Qemu record of {length} bytes: a restore refuses more than 1 MiB")
        if name == "Xenops":
            xenops = check_xenops_record(bytes(data[body:body + length]), body)
        if name == "Libxc":
            libxc = check_stream(data, offset=body, allow_trailing=True, **kwargs)
            off = body + libxc["length"]
            continue
        if name == "End_of_image":
            off = body
            break
        if body + length > len(data):
            raise StreamCheckError(off, f"{name} record of {length} bytes runs past the end")
        off = body + length
    if headers[:2] != ["Xenops", "Libxc"]:
        raise StreamCheckError(0, f"suspend image starts with {headers[:2]}, not Xenops then Libxc")
    if off != len(data):
        raise StreamCheckError(off, f"{len(data) - off} bytes after End_of_image")
    return {"headers": headers, "xenops": xenops, "libxc": libxc}


def _format_summary(summary: dict[str, Any]) -> str:
    """Human summary: headers, page totals and record counts by type."""
    counts = Counter(name for name, _ in summary["records"])
    lines = [
        f"libxc stream v{summary['version']}, domain type {summary['domain_type']} "
        f"({DOMAIN_TYPES.get(summary['domain_type'], '?')}), Xen "
        f"{summary['xen_version'][0]}.{summary['xen_version'][1]}",
        f"{len(summary['records'])} records, {summary['length']} bytes, "
        f"{summary['page_records']} PAGE_DATA records carrying "
        f"{summary['pages']} pages",
    ]
    lines += [f"  {name}: {n}" for name, n in counts.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """CLI: print the summary (exit 0) or the first violation (exit 1)."""
    parser = argparse.ArgumentParser(
        description="Check a libxc migration stream (v2/v3) against the Xen rules.")
    parser.add_argument("file")
    parser.add_argument("--offset", type=lambda s: int(s, 0), default=0,
                        help="byte offset of the image header in FILE")
    parser.add_argument("--any-domain", action="store_true",
                        help="accept x86 PV as well as x86 HVM")
    parser.add_argument("--allow-optional", action="store_true",
                        help="skip optional (bit 31) records")
    parser.add_argument("--allow-trailing", action="store_true",
                        help="accept bytes after the END record")
    parser.add_argument("--inband", action="store_true",
                        help="read this project's COMPRESSED_PAGE_DATA and DELTA_PAGE_DATA records")
    parser.add_argument("--image", action="store_true",
                        help="FILE is a suspend image (xenopsd's framing around the stream)")
    args = parser.parse_args(argv)
    try:
        if args.image:
            with open(args.file, "rb") as f:
                image = check_image(f.read(), hvm_expected=not args.any_domain,
                                    allow_optional=args.allow_optional, inband=args.inband)
            summary = image["libxc"]
        else:
            summary = check_file(args.file, args.offset,
                                 hvm_expected=not args.any_domain,
                                 allow_optional=args.allow_optional,
                                 allow_trailing=args.allow_trailing, inband=args.inband)
    except (StreamCheckError, OSError) as exc:
        print(f"{args.file}: INVALID: {exc}", file=sys.stderr)
        return 1
    if args.image:
        xenops = image["xenops"]
        print(f"suspend image: {', '.join(image['headers'])}; Xenops record time {xenops['time']}, "
              f"word_size {xenops['word_size']}, vm_str "
              + ("absent" if xenops["vm_str"] is None else f"{len(xenops['vm_str'])} bytes"))
    print(_format_summary(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
