"""The libxc migration stream (v3): headers and records, parse and build side by side.

Layout and names follow Xen's docs/specs/libxc-migration-stream.pandoc. The
image header is big-endian; everything after it is in the stream's
endianness, which this project always writes as little-endian.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import numpy as np

from xenemu.memory import PAGE_SHIFT, PAGE_SIZE

# Image header -------------------------------------------------------------
IHDR_FORMAT = "!QIIHHI"
IHDR_SIZE = struct.calcsize(IHDR_FORMAT)           # 24
IHDR_MARKER = 0xFFFFFFFFFFFFFFFF
IHDR_IDENT = 0x58454E46                            # "XENF"
IHDR_VERSION = 3
IHDR_SUPPORTED_VERSIONS = (2, 3)
IHDR_OPT_BIT_ENDIAN = 0
IHDR_OPT_LE = 0 << IHDR_OPT_BIT_ENDIAN
IHDR_OPT_BE = 1 << IHDR_OPT_BIT_ENDIAN
IHDR_OPT_RESERVED_MASK = 0xFFFE

# Domain header ------------------------------------------------------------
DHDR_FORMAT = "<IHHII"
DHDR_SIZE = struct.calcsize(DHDR_FORMAT)           # 16
DHDR_TYPE_X86_PV = 0x0001
DHDR_TYPE_X86_HVM = 0x0002
DHDR_TYPES = {DHDR_TYPE_X86_PV: "x86 PV", DHDR_TYPE_X86_HVM: "x86 HVM", 0x0003: "x86 PVH", 0x0004: "ARM"}
XEN_MAJOR, XEN_MINOR = 4, 17

# Records ------------------------------------------------------------------
RH_FORMAT = "<II"
RH_SIZE = struct.calcsize(RH_FORMAT)               # 8

REC_TYPE_END = 0x00000000
REC_TYPE_PAGE_DATA = 0x00000001
REC_TYPE_X86_PV_INFO = 0x00000002
REC_TYPE_X86_PV_P2M_FRAMES = 0x00000003
REC_TYPE_X86_PV_VCPU_BASIC = 0x00000004
REC_TYPE_X86_PV_VCPU_EXTENDED = 0x00000005
REC_TYPE_X86_PV_VCPU_XSAVE = 0x00000006
REC_TYPE_SHARED_INFO = 0x00000007
REC_TYPE_X86_TSC_INFO = 0x00000008
REC_TYPE_HVM_CONTEXT = 0x00000009
REC_TYPE_HVM_PARAMS = 0x0000000A
REC_TYPE_TOOLSTACK = 0x0000000B
REC_TYPE_X86_PV_VCPU_MSRS = 0x0000000C
REC_TYPE_VERIFY = 0x0000000D
REC_TYPE_CHECKPOINT = 0x0000000E
REC_TYPE_CHECKPOINT_DIRTY_PFN_LIST = 0x0000000F
REC_TYPE_STATIC_DATA_END = 0x00000010
REC_TYPE_X86_CPUID_POLICY = 0x00000011
REC_TYPE_X86_MSR_POLICY = 0x00000012
# This project's in-band compressed page data: see docs/compressed-page-data.md.
REC_TYPE_COMPRESSED_PAGE_DATA = 0x00000013
# Ours too: re-sent pages as XOR deltas against what the stream sent before (docs/delta-page-data.md).
REC_TYPE_DELTA_PAGE_DATA = 0x00000014
REC_TYPE_OPTIONAL = 0x80000000

RECORD_NAMES = {
    REC_TYPE_END: "End", REC_TYPE_PAGE_DATA: "Page data", REC_TYPE_X86_PV_INFO: "x86 PV info",
    REC_TYPE_X86_PV_P2M_FRAMES: "x86 PV P2M frames", REC_TYPE_X86_PV_VCPU_BASIC: "x86 PV vcpu basic",
    REC_TYPE_X86_PV_VCPU_EXTENDED: "x86 PV vcpu extended", REC_TYPE_X86_PV_VCPU_XSAVE: "x86 PV vcpu xsave",
    REC_TYPE_SHARED_INFO: "Shared info", REC_TYPE_X86_TSC_INFO: "x86 TSC info",
    REC_TYPE_HVM_CONTEXT: "HVM context", REC_TYPE_HVM_PARAMS: "HVM params", REC_TYPE_TOOLSTACK: "Toolstack",
    REC_TYPE_X86_PV_VCPU_MSRS: "x86 PV vcpu msrs", REC_TYPE_VERIFY: "Verify", REC_TYPE_CHECKPOINT: "Checkpoint",
    REC_TYPE_CHECKPOINT_DIRTY_PFN_LIST: "Checkpoint dirty pfn list", REC_TYPE_STATIC_DATA_END: "Static data end",
    REC_TYPE_X86_CPUID_POLICY: "x86 CPUID policy", REC_TYPE_X86_MSR_POLICY: "x86 MSR policy",
    REC_TYPE_COMPRESSED_PAGE_DATA: "Compressed page data", REC_TYPE_DELTA_PAGE_DATA: "Delta page data",
}

# PAGE_DATA ----------------------------------------------------------------
PAGE_DATA_FORMAT = "<II"                           # count, reserved
PAGE_DATA_SIZE = struct.calcsize(PAGE_DATA_FORMAT)
PAGE_DATA_MAX_PFNS = 1024
PFN_MASK = (1 << 52) - 1
PFN_RESERVED_MASK = ((1 << 60) - 1) & ~PFN_MASK     # bits 59-52
PFN_TYPE_SHIFT = 60
PFINFO_NOTAB = 0x0
PFINFO_L1TAB, PFINFO_L2TAB, PFINFO_L3TAB, PFINFO_L4TAB = 0x1, 0x2, 0x3, 0x4
PFINFO_BROKEN = 0xD
PFINFO_XALLOC = 0xE
PFINFO_XTAB = 0xF
PFINFO_VALID_TYPES = {PFINFO_NOTAB, PFINFO_L1TAB, PFINFO_L2TAB, PFINFO_L3TAB, PFINFO_L4TAB,
                      PFINFO_BROKEN, PFINFO_XALLOC, PFINFO_XTAB}
PFINFO_NO_DATA = {PFINFO_BROKEN, PFINFO_XALLOC, PFINFO_XTAB}

# Fixed-layout bodies --------------------------------------------------------
X86_TSC_INFO_FORMAT = "<IIQII"                     # mode, khz, nsec, incarnation, reserved
X86_TSC_INFO_SIZE = struct.calcsize(X86_TSC_INFO_FORMAT)
HVM_PARAMS_FORMAT = "<II"                          # count, reserved
HVM_PARAMS_ENTRY_SIZE = 16                         # index u64, value u64
X86_CPUID_POLICY_ENTRY_SIZE = 24                   # leaf, subleaf, a, b, c, d
X86_MSR_POLICY_ENTRY_SIZE = 16                     # idx u32, flags u32, val u64

# A receiver refuses a longer record before allocating for it.
MAX_RECORD_BODY = 16 << 20


class StreamError(Exception):
    """The stream breaks a rule of the format; the text names the rule."""


def padding(length: int) -> int:
    return -length % 8


def record_name(rtype: int) -> str:
    return RECORD_NAMES.get(rtype, f"optional 0x{rtype:08x}" if rtype & REC_TYPE_OPTIONAL else f"0x{rtype:08x}")


# Image header -------------------------------------------------------------
def build_image_header() -> bytes:
    return struct.pack(IHDR_FORMAT, IHDR_MARKER, IHDR_IDENT, IHDR_VERSION, IHDR_OPT_LE, 0, 0)


def parse_image_header(raw: bytes) -> int:
    """Validate the image header; returns the stream version."""
    marker, ident, version, options, res1, res2 = struct.unpack(IHDR_FORMAT, raw)
    if marker != IHDR_MARKER:
        raise StreamError(f"bad image header marker 0x{marker:016x}")
    if ident != IHDR_IDENT:
        raise StreamError(f"bad image header id 0x{ident:08x} (expected XENF)")
    if version not in IHDR_SUPPORTED_VERSIONS:
        raise StreamError(f"unsupported stream version {version}")
    if options & IHDR_OPT_RESERVED_MASK:
        raise StreamError(f"reserved image header option bits set: 0x{options:04x}")
    if options & IHDR_OPT_BE:
        raise StreamError("big-endian streams are not supported")
    if res1 or res2:
        raise StreamError("image header reserved fields are not zero")
    return version


# Domain header ------------------------------------------------------------
def build_domain_header(dtype: int = DHDR_TYPE_X86_HVM) -> bytes:
    return struct.pack(DHDR_FORMAT, dtype, PAGE_SHIFT, 0, XEN_MAJOR, XEN_MINOR)


def parse_domain_header(raw: bytes) -> int:
    """Validate the domain header; returns the domain type."""
    dtype, page_shift, reserved, _major, _minor = struct.unpack(DHDR_FORMAT, raw)
    if dtype not in DHDR_TYPES:
        raise StreamError(f"unknown domain type 0x{dtype:x}")
    if dtype != DHDR_TYPE_X86_HVM:
        raise StreamError(f"domain type {DHDR_TYPES[dtype]} not supported (HVM only)")
    if page_shift != PAGE_SHIFT:
        raise StreamError(f"page shift {page_shift}, expected {PAGE_SHIFT}")
    if reserved:
        raise StreamError("domain header reserved field is not zero")
    return dtype


# Records ------------------------------------------------------------------
def record_header(rtype: int, length: int) -> bytes:
    return struct.pack(RH_FORMAT, rtype, length)


def build_record(rtype: int, body: bytes = b"") -> bytes:
    return record_header(rtype, len(body)) + body + bytes(padding(len(body)))


def parse_record_header(raw: bytes) -> tuple[int, int]:
    rtype, length = struct.unpack(RH_FORMAT, raw)
    if length > MAX_RECORD_BODY:
        raise StreamError(f"{record_name(rtype)} record length {length} exceeds the limit {MAX_RECORD_BODY}")
    return rtype, length


# PAGE_DATA ----------------------------------------------------------------
def page_data_header(pfns: np.ndarray) -> bytes:
    """Count, reserved and the pfn array (type NOTAB) of a PAGE_DATA body."""
    if not 0 < len(pfns) <= PAGE_DATA_MAX_PFNS:
        raise ValueError(f"PAGE_DATA carries 1..{PAGE_DATA_MAX_PFNS} pfns, not {len(pfns)}")
    return struct.pack(PAGE_DATA_FORMAT, len(pfns), 0) + pfns.astype("<u8").tobytes()


def page_data_record_header(npfns: int) -> bytes:
    return record_header(REC_TYPE_PAGE_DATA, PAGE_DATA_SIZE + 8 * npfns + PAGE_SIZE * npfns)


@dataclass
class PageData:
    pfns: np.ndarray        # uint64 pfns that carry data, in record order
    data_offset: int        # where their 4096-byte frames start in the body


def parse_page_data(body: bytes | memoryview, npages: int) -> PageData:
    """Validate a PAGE_DATA body against the domain of `npages` pages."""
    if len(body) < PAGE_DATA_SIZE:
        raise StreamError(f"PAGE_DATA record too short ({len(body)} bytes)")
    count, reserved = struct.unpack_from(PAGE_DATA_FORMAT, body)
    if count == 0:
        raise StreamError("PAGE_DATA record with count 0")
    if count > PAGE_DATA_MAX_PFNS:
        raise StreamError(f"PAGE_DATA record with {count} pfns (at most {PAGE_DATA_MAX_PFNS})")
    if reserved:
        raise StreamError("PAGE_DATA reserved field is not zero")
    if len(body) < PAGE_DATA_SIZE + 8 * count:
        raise StreamError(f"PAGE_DATA record too short for {count} pfns")
    entries = np.frombuffer(body, dtype="<u8", count=count, offset=PAGE_DATA_SIZE)
    return check_pfn_entries(entries, len(body) - PAGE_DATA_SIZE - 8 * count, npages, PAGE_DATA_SIZE + 8 * count)


def check_pfn_entries(entries: np.ndarray, data_bytes: int, npages: int, data_offset: int) -> PageData:
    if np.any(entries & np.uint64(PFN_RESERVED_MASK)):
        raise StreamError("PAGE_DATA pfn entry with reserved bits set")
    types = (entries >> np.uint64(PFN_TYPE_SHIFT)).astype(np.uint8)
    bad = set(np.unique(types).tolist()) - PFINFO_VALID_TYPES
    if bad:
        raise StreamError(f"PAGE_DATA pfn type 0x{min(bad):x} is invalid")
    pfns = entries & np.uint64(PFN_MASK)
    with_data = ~np.isin(types, list(PFINFO_NO_DATA))
    data_pfns = pfns[with_data]
    if data_pfns.size and int(data_pfns.max()) >= npages:
        raise StreamError(f"pfn 0x{int(data_pfns.max()):x} is beyond the domain's {npages} pages")
    if data_bytes != PAGE_SIZE * data_pfns.size:
        raise StreamError(f"PAGE_DATA carries {data_bytes} bytes of page data for {data_pfns.size} pages")
    return PageData(data_pfns, data_offset)


# Page encoders: how a saver turns a batch of pages into records ------------
class Encoded(NamedTuple):
    buffers: list            # what to writev: record header, body parts, padding
    zero_pages: int          # pages sent without data


class PageEncoder(Protocol):
    """`pages` may be a view of memory the guest is writing. A page read once is safe: if the
    guest wrote it meanwhile, it is dirty and a later iteration sends it again. An encoder that
    reads a page more than once (zstd: match finding, then literals and checksum) must first
    copy it out in one pass and encode only the copy, or a write between two reads could give
    *other* pages content they never had, and those are not dirty."""

    threads: int             # batches it may encode at once (it must then be thread-safe)

    def encode(self, pfns: np.ndarray, pages: np.ndarray) -> Encoded: ...


class PlainPages:
    """Upstream PAGE_DATA: every page of the batch, uncompressed."""

    threads = 1              # (writev reads each byte once)

    def encode(self, pfns: np.ndarray, pages: np.ndarray) -> Encoded:
        return Encoded([page_data_record_header(len(pfns)), page_data_header(pfns), pages], 0)


# Context records ------------------------------------------------------------
def build_hvm_params(pairs: bytes) -> bytes:
    return struct.pack(HVM_PARAMS_FORMAT, len(pairs) // HVM_PARAMS_ENTRY_SIZE, 0) + pairs


def parse_hvm_params(body: bytes) -> bytes:
    if len(body) < 8:
        raise StreamError("HVM_PARAMS record too short")
    count, reserved = struct.unpack_from(HVM_PARAMS_FORMAT, body)
    if reserved:
        raise StreamError("HVM_PARAMS reserved field is not zero")
    if len(body) != 8 + count * HVM_PARAMS_ENTRY_SIZE:
        raise StreamError(f"HVM_PARAMS length {len(body)} does not match count {count}")
    return bytes(body[8:])


def check_tsc_info(body: bytes) -> bytes:
    if len(body) != X86_TSC_INFO_SIZE:
        raise StreamError(f"X86_TSC_INFO length {len(body)}, expected {X86_TSC_INFO_SIZE}")
    if struct.unpack(X86_TSC_INFO_FORMAT, body)[4]:
        raise StreamError("X86_TSC_INFO reserved field is not zero")
    return bytes(body)


def check_array(name: str, body: bytes, entry_size: int) -> bytes:
    if len(body) % entry_size:
        raise StreamError(f"{name} length {len(body)} is not a multiple of {entry_size}")
    return bytes(body)
