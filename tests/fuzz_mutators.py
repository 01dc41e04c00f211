"""The fuzz's mutations: each edits a seed's model (fuzz_model) where a reader must check something.

Structure-aware mutators (m_*) take the image and hypothesis' data and return what they did (a
hypothesis note); MUTATORS weights them by listing some more than once; byte-level ones run last,
at offsets taken mostly at structure boundaries. WORST names the inputs with the largest claims a
reader could act on, and the regressions the fuzz found, each run on its own.
"""
from __future__ import annotations

import copy
import functools
import random
import struct
import uuid as uuidlib
from collections.abc import Callable

import zstandard
from hypothesis import note
from hypothesis import strategies as st

from fuzz_model import (KINDS, MEMORY, MIB, NPAGES, Image, Part, Rec, Seeds, bomb, expected_inflated, frame_of,
                        meta_length, page_fields, part, records_of, set_payload, slow_frame, vm_of, with_content_size,
                        with_vm)
from xenemu.memory import PAGE_SIZE
from xenmig import compressed, delta, image, libxc
from xenopsd_shim import zstdframe


# Mutations: each takes the image and hypothesis' data, returns what it did ------------
def edges_or_any(edges: list[int], lo: int, hi: int) -> st.SearchStrategy[int]:
    """One of the values a reader is likeliest to get wrong, or any in [lo, hi]."""
    return st.one_of(st.sampled_from(edges), st.integers(lo, hi))


def u(bits: int) -> st.SearchStrategy[int]:
    top = (1 << bits) - 1
    return edges_or_any([0, 1, 2, 3, 0x7F, 0xFF, top, top >> 1, (top >> 1) + 1], 0, top)


def pick(data, items: list, what: str):
    return data.draw(st.sampled_from(items), label=what) if items else None



HEADER_TYPES = [*image.NAMES, 0, 1, 0xFF, 0x0F12, 0x10000, -1, -image.XENOPS, 2**63 - 1, -2**63]


def m_header_type(img: Image, data) -> str:
    p = pick(data, img.parts, "part")
    old, p.htype = p.htype, data.draw(edges_or_any(HEADER_TYPES, -2**63, 2**63 - 1))
    return f"suspend header type {image.name(old)} -> {p.htype:#x}"


def m_header_length(img: Image, data) -> str:
    p = pick(data, img.parts, "part")
    n = len(p.payload)
    p.length = data.draw(edges_or_any([0, 1, -1, n - 1, n + 1, n + 4096, image.MAX_XENOPS_RECORD,
                                       image.MAX_XENOPS_RECORD + 1, 2**31, 2**62, 2**63 - 1, -2**63],
                                      -2**63, 2**63 - 1))
    return f"suspend header {image.name(p.htype)} length {n} -> {p.length}"


XENOPS_VALUES = {
    "name": ["../../etc/passwd", "..", "", "a" * 65, "vm 1", "vm\n1", "-vm", "vm/1", 5, None, ["vm"], "vm\u00e9"],
    "uuid": ["", "not-a-uuid", "../../x", "0" * 32, "00000000-0000-0000-0000-00000000000G",
             "00000000-0000-0000-0000-0000000000000", 5, None, "ABCDEF01-0000-0000-0000-000000000000"],
    "memory_bytes": [0, -4096, 4095, 4096, MEMORY - 4096, 64 << 30, (64 << 30) + 4096, 1 << 62, 2**64, 2**200,
                     1.5, 8388608.0, "8388608", True, None, [MEMORY]],
    "workload": ["dirty:", "dirty:1ZB/s", "increment:-1", "nope", "dirty:1MB/s", 5, None, ""],
    "vgpu_bytes": [-4096, 1, 4095, 1 << 62, "4096", None, 1.0],
}
XENOPS_RAW = [b"", b"{", b"null", b"[]", b'"vm"', b"\xff\xfe\x00", b"{}", b"[" * 100_000, b'{"a":' * 100_000,
              b'{"name": "vm", "uuid": "%s", "memory_bytes": ' + b"9" * 5000 + b"}"]
# Whole records: S-expressions a reader must refuse in one line, or (a real xenopsd's) cannot build a VM from.
SEXP_RAW = [b"", b"(", b")", b"()", b"atom", b'"atom"', b"(" * 100_000, b"(" * 65 + b")" * 65, b"((time 1)(word_size",
            b'((time 1)(word_size 64)(vm_str"unterminated', b"((time 1)(word_size 64)) trailing",
            b"((time 1)(word_size 64))", b"((time 1)(word_size 64)(xs_subtree((a b)(c d))))",
            b"((time 1)(word_size sixty-four))", b"((time 1)(word_size 64)(word_size 64))",
            b"((time 1)(word_size 64)(extra 1))", b"((time 1))", b"((time 1)(word_size 64)(vm_str(a b)))",
            b"((time 1)(word_size 64)(xs_subtree(a)))", b"((time 1)(word_size 64)(vm_str\"\\999\"))",
            b"; comment\n((time 1)(word_size 64))", b"#|c|#((time 1)(word_size 64))",
            b'((time 1)(word_size 64)(vm_str"((id 3f0a)(name vm))"))', b"(a (b" + b" x" * 70_000 + b"))",
            b"((time 1)(word_size 64)(vm_str\"\\" + b"\xff" * 10 + b"\"))"]


def m_xenops(img: Image, data) -> str:
    xen = next((p for p in img.parts if p.htype == image.XENOPS), None)
    if xen is None:
        return "no Xenops record"
    how = data.draw(st.sampled_from(["field", "field", "drop", "raw", "sexp", "second"]))
    try:
        rec = vm_of(xen.payload)
    except (AssertionError, ValueError, RecursionError, image.ImageError):
        rec = None
    if not isinstance(rec, dict):           # an earlier mutation replaced it
        rec = {}
    if how == "field":
        key = data.draw(st.sampled_from(sorted(XENOPS_VALUES)))
        rec[key] = data.draw(st.sampled_from(XENOPS_VALUES[key]))
        xen.payload = with_vm(rec)
        return f"Xenops {key} = {rec[key]!r:.80}"
    if how == "drop" and rec:
        key = data.draw(st.sampled_from(sorted(rec)))
        del rec[key]
        xen.payload = with_vm(rec)
        return f"Xenops without {key}"
    if how in ("raw", "drop"):
        raw = data.draw(st.sampled_from(XENOPS_RAW)).replace(b"%s", img.uuid.encode())
        xen.payload = image.build_xenops_record(image.XenopsRecord(image.now(), 64, raw.decode("latin-1"), []))
        return f"Xenops vm_str {raw[:20]!r}... ({len(raw)} bytes)"
    if how == "sexp":
        xen.payload = data.draw(st.sampled_from(SEXP_RAW))
        return f"Xenops record {xen.payload[:20]!r}... ({len(xen.payload)} bytes)"
    img.parts.insert(img.parts.index(xen) + 1, copy.copy(xen))
    return "second Xenops record"


def m_parts(img: Image, data) -> str:
    how = data.draw(st.sampled_from(["drop", "dup", "swap", "insert"]))
    i = data.draw(st.integers(0, len(img.parts) - 1)) if img.parts else 0
    if not img.parts:
        return "no parts"
    if how == "drop":
        p = img.parts.pop(i)
        return f"dropped {image.name(p.htype)}"
    if how == "dup":
        img.parts.insert(i, copy.deepcopy(img.parts[i]))
        return f"duplicated {image.name(img.parts[i].htype)}"
    if how == "swap":
        j = data.draw(st.integers(0, len(img.parts) - 1))
        img.parts[i], img.parts[j] = img.parts[j], img.parts[i]
        return f"swapped parts {i} and {j}"
    new = data.draw(st.sampled_from([
        Part(image.QEMU_TRAD, bytes(image.MAX_QEMU_RECORD)), Part(image.QEMU_TRAD, b""),
        Part(image.DEMU), Part(image.LIBXL, b"x"), Part(image.QEMU_XEN, b"x"), Part(image.VARSTORED, b"x"),
        Part(image.SWTPM), Part(image.SWTPM0, b"x"), Part(image.END_OF_IMAGE), Part(image.LIBXC),
        Part(image.LIBXC_LEGACY)]))
    img.parts.insert(i, copy.deepcopy(new))
    return f"inserted {image.name(new.htype)} ({len(new.payload)} bytes) at {i}"


def m_signature(img: Image, data) -> str:
    img.signature = data.draw(st.sampled_from([b"XenSavedDomain\n", b"XenSavedDomv2-\r", b"XenSavedDomv3-\n",
                                               b"XenSavedDomv2-", b"", b"\x00" * 15, b"xensaveddomv2-\n"]))
    return f"signature {img.signature!r}"


def m_tail(img: Image, data) -> str:
    size = data.draw(st.sampled_from([1, 8, 16, 4096, 200 << 10, 4 * MIB]))
    seed = data.draw(st.integers(0, 2**32))
    img.tail = random.Random(seed).randbytes(size) if data.draw(st.booleans()) else bytes(size)
    return f"{size} bytes after End_of_image"


def field_widths(fmt: str) -> tuple[int, ...]:
    """The width in bits of each field of a struct format (one letter a field, as the headers are)."""
    return tuple(8 * struct.calcsize(fmt[0] + c) for c in fmt[1:])


IHDR_WIDTHS = field_widths(libxc.IHDR_FORMAT)      # (64, 32, 32, 16, 16, 32)
DHDR_WIDTHS = field_widths(libxc.DHDR_FORMAT)      # (32, 16, 16, 32, 32)


def m_libxc_headers(img: Image, data) -> str:
    s = img.libxc()
    if s is None:
        return "no libxc stream"
    if data.draw(st.booleans()):
        fields = list(struct.unpack(libxc.IHDR_FORMAT, s.ihdr))
        i = data.draw(st.integers(0, len(fields) - 1))
        fields[i] = data.draw(u(IHDR_WIDTHS[i]))
        s.ihdr = struct.pack(libxc.IHDR_FORMAT, *fields)
        return f"libxc image header field {i} = {fields[i]:#x}"
    fields = list(struct.unpack(libxc.DHDR_FORMAT, s.dhdr))
    i = data.draw(st.integers(0, len(fields) - 1))
    fields[i] = data.draw(u(DHDR_WIDTHS[i]))
    s.dhdr = struct.pack(libxc.DHDR_FORMAT, *fields)
    return f"libxc domain header field {i} = {fields[i]:#x}"


REC_TYPES = [*range(0x15), 0x7FFFFFFF, 0x80000000, 0x80000001, 0x80000013, 0xFFFFFFFF]


def on_a_record(edit: Callable[[Rec, object], str]) -> Callable[[Image, object], str]:
    """A mutator that edits one libxc record, the one hypothesis picks."""
    @functools.wraps(edit)
    def mutator(img: Image, data) -> str:
        r = pick(data, records_of(img), "record")
        return "no records" if r is None else edit(r, data)
    return mutator


@on_a_record
def m_rec_type(r: Rec, data) -> str:
    old, r.rtype = r.rtype, data.draw(edges_or_any(REC_TYPES, 0, 2**32 - 1))
    return f"record type {libxc.record_name(old)} -> {r.rtype:#x}"


@on_a_record
def m_rec_length(r: Rec, data) -> str:
    n = len(r.body)
    edges = [x for x in (0, 1, n - 1, n + 1, n - 8, n + 8, n + 4096, libxc.MAX_RECORD_BODY,
                         libxc.MAX_RECORD_BODY + 1, 2**31, 2**32 - 1) if 0 <= x < 2**32]
    r.length = data.draw(edges_or_any(edges, 0, 2**32 - 1))
    return f"{libxc.record_name(r.rtype)} length field {n} -> {r.length}"


@on_a_record
def m_rec_resize(r: Rec, data) -> str:
    n = len(r.body)
    new = data.draw(edges_or_any([0, 1, 8, 16, max(0, n - 4096), max(0, n - 1), n + 1, n + 4096], 0, n + 64))
    r.body = r.body[:new] + bytes(max(0, new - n))
    return f"{libxc.record_name(r.rtype)} body {n} -> {new} bytes (length field in step)"


@on_a_record
def m_rec_padding(r: Rec, data) -> str:
    r.pad = data.draw(st.sampled_from([b"\x01", b"\x00" * 7 + b"\x80", b"", b"\x00" * 9, b"\xff" * 8]))
    return f"{libxc.record_name(r.rtype)} padding {r.pad!r}"


def m_rec_order(img: Image, data) -> str:
    s = img.libxc()
    if s is None or not s.records:
        return "no records"
    recs = s.records
    how = data.draw(st.sampled_from(["drop", "dup", "move", "page-first", "insert"]))
    i = data.draw(st.integers(0, len(recs) - 1))
    if how == "drop":
        return f"dropped {libxc.record_name(recs.pop(i).rtype)}"
    if how == "dup":
        recs.insert(i, copy.copy(recs[i]))
        return f"duplicated {libxc.record_name(recs[i].rtype)}"
    if how == "move":
        r = recs.pop(i)
        j = data.draw(st.integers(0, len(recs)))
        recs.insert(j, r)
        return f"moved {libxc.record_name(r.rtype)} from {i} to {j}"
    if how == "page-first":
        page = next((r for r in recs if r.rtype in (libxc.REC_TYPE_PAGE_DATA, compressed.REC_TYPE)), None)
        if page is None:
            return "no page records"
        recs.remove(page)
        recs.insert(0, page)
        return "page record before STATIC_DATA_END"
    rtype = data.draw(st.sampled_from([libxc.REC_TYPE_VERIFY, libxc.REC_TYPE_CHECKPOINT, 0x14, 0x7FFFFFFF,
                                       0x80000000, 0x80001234, libxc.REC_TYPE_STATIC_DATA_END,
                                       libxc.REC_TYPE_HVM_CONTEXT]))
    body = data.draw(st.sampled_from([b"", b"x" * 8, bytes(4096)]))
    recs.insert(i, Rec(rtype, body))
    return f"inserted record {rtype:#x} ({len(body)} bytes) at {i}"


def pfn_values(old: int) -> st.SearchStrategy[int]:
    pfn = old & libxc.PFN_MASK
    return edges_or_any([NPAGES, NPAGES - 1, NPAGES + 1, libxc.PFN_MASK, 2**64 - 1, pfn | 1 << 52, pfn | 1 << 59, 0]
                        + [pfn | t << libxc.PFN_TYPE_SHIFT for t in range(16)], 0, 2**64 - 1)


def m_page_record(img: Image, data) -> str:
    r = pick(data, records_of(img, (libxc.REC_TYPE_PAGE_DATA, compressed.REC_TYPE)), "page record")
    if r is None:
        return "no page records"
    offset, n = page_fields(r)
    name = libxc.record_name(r.rtype)
    how = data.draw(st.sampled_from(["header", "pfn", "pfn", "all-xtab", "duplicate-pfn"]))
    body = bytearray(r.body)
    if how == "header" or n == 0:
        fmt = libxc.PAGE_DATA_FORMAT if r.rtype == libxc.REC_TYPE_PAGE_DATA else compressed.HEADER_FORMAT
        if len(body) < struct.calcsize(fmt):
            return f"{name} too short to edit its header"        # an earlier mutation cut it
        fields = list(struct.unpack_from(fmt, body))
        i = data.draw(st.integers(0, len(fields) - 1))
        width = field_widths(fmt)[i]
        fields[i] = data.draw(st.one_of(st.sampled_from([0, 1, n - 1, n + 1, 1024, 1025, 2**width - 1]).filter(
            lambda x: 0 <= x < 2**width), u(width)))
        struct.pack_into(fmt, body, 0, *fields)
        what = f"{name} header field {i} = {fields[i]}"
    elif how == "pfn":
        i = data.draw(st.integers(0, n - 1))
        old = struct.unpack_from("<Q", body, offset + 8 * i)[0]
        new = data.draw(pfn_values(old))
        struct.pack_into("<Q", body, offset + 8 * i, new)
        what = f"{name} entry {i} {old:#x} -> {new:#x}"
    elif how == "all-xtab":
        for i in range(n):
            old = struct.unpack_from("<Q", body, offset + 8 * i)[0]
            struct.pack_into("<Q", body, offset + 8 * i, old | libxc.PFINFO_XTAB << 60)
        what = f"{name}: every entry XTAB (data still there)"
    else:
        i, j = data.draw(st.integers(0, n - 1)), data.draw(st.integers(0, n - 1))
        body[offset + 8 * j:offset + 8 * j + 8] = body[offset + 8 * i:offset + 8 * i + 8]
        what = f"{name}: entry {j} repeats entry {i}"
    r.body = bytes(body)
    return what


def m_bitmap(img: Image, data) -> str:
    r = pick(data, records_of(img, (compressed.REC_TYPE,)), "compressed record")
    if r is None:
        return "no compressed records"
    offset, n = page_fields(r)
    start = offset + 8 * n
    end = start + compressed.bitmap_size(n)
    if end > len(r.body):
        return "no bitmap"
    bit = data.draw(st.integers(0, 8 * (end - start) - 1))
    body = bytearray(r.body)
    body[start + bit // 8] ^= 1 << bit % 8
    if data.draw(st.booleans()):      # keep zero_count in step with the bitmap
        zc = struct.unpack_from("<I", body, 8)[0]
        struct.pack_into("<I", body, 8, (zc + (1 if body[start + bit // 8] >> bit % 8 & 1 else -1)) % 2**32)
    r.body = bytes(body)
    return f"compressed record bitmap bit {bit} flipped (count {n})"


def m_payload(img: Image, data) -> str:
    r = pick(data, records_of(img, (compressed.REC_TYPE,)), "compressed record")
    if r is None:
        return "no compressed records"
    payload = r.body[meta_length(struct.unpack_from("<I", r.body)[0]):]
    expected = expected_inflated(r.body)
    how = data.draw(st.sampled_from(["corrupt", "corrupt-header", "truncate", "bomb", "bomb-declared",
                                     "bomb-lies", "extra-frame", "skippable", "empty", "garbage", "checksum",
                                     "other-data", "no-size", "no-checksum", "big-window"]))
    seed = data.draw(st.integers(0, 2**32))
    rng = random.Random(seed)
    if how in ("corrupt", "corrupt-header") and payload:
        buf = bytearray(payload)
        at = rng.randrange(min(len(buf), 16)) if how == "corrupt-header" else rng.randrange(len(buf))
        buf[at] ^= 1 << rng.randrange(8)
        payload = bytes(buf)
    elif how == "truncate":
        payload = payload[:rng.randrange(len(payload) + 1)]
    elif how == "bomb":
        payload = bomb(declared=False)
    elif how == "bomb-declared":
        payload = bomb(declared=True)
    elif how == "bomb-lies":
        payload = with_content_size(bomb(declared=True), expected)
    elif how == "extra-frame":
        payload += frame_of(b"x" * 4096)
    elif how == "skippable":
        skip = struct.pack("<II", zstdframe.SKIPPABLE_MAGIC + rng.randrange(16), 8) + bytes(8)
        payload = skip + payload if rng.random() < 0.5 else skip
    elif how == "empty":
        payload = b""
    elif how == "garbage":
        payload = rng.randbytes(rng.choice([1, 64, len(payload)]))
    elif how == "checksum":
        framed = bytearray(frame_of(rng.randbytes(16) * (expected // 16)))
        framed[-1] ^= 0x40
        payload = bytes(framed)
    elif how == "other-data":      # a valid frame of the right size: a harmless change of memory
        payload = frame_of(rng.randbytes(64) * (expected // 64))
    elif how == "no-size":         # the frame does not declare its size: refused
        payload = frame_of(bytes(expected), write_content_size=False)
    elif how == "no-checksum":     # the right pages, but nothing to check them by: refused
        payload = frame_of(rng.randbytes(64) * (expected // 64), write_checksum=False)
    elif how == "big-window":      # a 128 MiB window (streamed, size unknown): refused before inflating
        cobj = zstandard.ZstdCompressor(compression_params=zstandard.ZstdCompressionParameters(
            window_log=27, write_checksum=1)).compressobj()
        payload = cobj.compress(bytes(expected)) + cobj.flush()
    consistent = data.draw(st.booleans()) or how in ("bomb", "bomb-declared", "bomb-lies")
    set_payload(r, payload, consistent)
    return f"compressed record payload: {how} ({len(payload)} bytes, expected {expected}, consistent {consistent})"


def m_delta(img: Image, data) -> str:
    """A DELTA_PAGE_DATA field: its header, a pfn, a base or result crc, the crc padding, or its frame."""
    r = pick(data, records_of(img, (delta.REC_TYPE,)), "delta record")
    if r is None:
        return "no delta records"
    body = bytearray(r.body)
    n = min(struct.unpack_from("<I", body)[0], max(0, (len(body) - delta.HEADER_SIZE) // 16))
    how = data.draw(st.sampled_from(["header", "pfn", "base-crc", "result-crc", "frame", "frame", "swap-records"]))
    if how == "header" or n == 0:
        fields = list(struct.unpack_from(delta.HEADER_FORMAT, body))
        i = data.draw(st.integers(0, len(fields) - 1))
        width = field_widths(delta.HEADER_FORMAT)[i]
        fields[i] = data.draw(st.one_of(st.sampled_from([0, 1, 2, n - 1, n + 1, 1024, 1025]).filter(
            lambda x: 0 <= x < 2**width), u(width)))
        struct.pack_into(delta.HEADER_FORMAT, body, 0, *fields)
        what = f"header field {i} = {fields[i]}"
    elif how == "pfn":
        i = data.draw(st.integers(0, n - 1))
        at = delta.HEADER_SIZE + 8 * i
        old = struct.unpack_from("<Q", body, at)[0]
        new = data.draw(pfn_values(old))
        struct.pack_into("<Q", body, at, new)
        what = f"entry {i} {old:#x} -> {new:#x}"
    elif how in ("base-crc", "result-crc"):
        i = data.draw(st.integers(0, n - 1))
        at = delta.HEADER_SIZE + 8 * n + 4 * i + (4 * n if how == "result-crc" else 0)
        struct.pack_into("<I", body, at, data.draw(u(32)))
        what = f"{how} {i}"
    elif how == "frame":
        meta = delta.meta_size(n)
        seed = data.draw(st.integers(0, 2**32))
        rng = random.Random(seed)
        kind = data.draw(st.sampled_from(["truncate", "short", "long", "other-data", "garbage", "no-checksum"]))
        expected = PAGE_SIZE * n
        payload = {"truncate": lambda: bytes(body[meta:meta + rng.randrange(max(1, len(body) - meta))]),
                   "short": lambda: frame_of(bytes(expected - PAGE_SIZE)),
                   "long": lambda: frame_of(bytes(expected + PAGE_SIZE)),
                   "other-data": lambda: frame_of(rng.randbytes(64) * (expected // 64)),
                   "garbage": lambda: rng.randbytes(64),
                   "no-checksum": lambda: frame_of(bytes(expected), write_checksum=False)}[kind]()
        body = body[:meta] + payload
        struct.pack_into("<I", body, 8, len(payload))
        what = f"frame {kind} ({len(payload)} bytes)"
    else:                              # the second delta before the first: its bases are not what it says
        records = img.libxc().records
        i, j = [k for k, rec in enumerate(records) if rec.rtype == delta.REC_TYPE][:2]
        records[i], records[j] = records[j], records[i]
        return "delta records swapped"
    r.body = bytes(body)
    return f"DELTA_PAGE_DATA {what}"


def m_big_record(img: Image, data) -> str:
    """A record of the largest length a reader accepts, or just over it, in place of one."""
    s = img.libxc()
    if s is None or not s.records:
        return "no records"
    i = data.draw(st.integers(0, len(s.records) - 1))
    rtype = data.draw(st.sampled_from([libxc.REC_TYPE_PAGE_DATA, compressed.REC_TYPE, libxc.REC_TYPE_HVM_CONTEXT,
                                       0x80000000]))
    size = data.draw(st.sampled_from([libxc.MAX_RECORD_BODY, libxc.MAX_RECORD_BODY - 8]))
    body = bytearray(size)
    if rtype == compressed.REC_TYPE:       # a header in step with the length: the frame is what fails
        meta = meta_length(1024)
        struct.pack_into(compressed.HEADER_FORMAT, body, 0, 1024, 1, 0, 0, size - meta)
        struct.pack_into("<1024Q", body, compressed.HEADER_SIZE, *range(1024))
    elif rtype == libxc.REC_TYPE_PAGE_DATA:
        struct.pack_into("<II", body, 0, 1024, 0)
    s.records[i] = Rec(rtype, bytes(body))
    return f"record {i} replaced by {libxc.record_name(rtype)} of {size} bytes"


def near_marks(img: Image, data) -> int:
    """An offset in the image: mostly at or just after the start of a structure."""
    raw, marks = img.layout()
    if img.kind == "stream" and img.ops_on_wire:
        return data.draw(st.integers(0, 4096))
    if data.draw(st.integers(0, 4)) == 0:
        return data.draw(st.integers(0, len(raw)))
    return min(len(raw), data.draw(st.sampled_from(marks)) + data.draw(st.integers(0, 31)))


def wire_choice(img: Image, data) -> None:
    if img.kind == "stream" and not img.byte_ops:
        img.ops_on_wire = data.draw(st.booleans())


def m_truncate(img: Image, data) -> str:
    wire_choice(img, data)
    at = near_marks(img, data)
    img.byte_ops.append(("truncate", at))
    return f"truncated at {at}" + (" (zstd file)" if img.ops_on_wire else "")


def m_flip(img: Image, data) -> str:
    wire_choice(img, data)
    flips = [(near_marks(img, data), data.draw(st.integers(0, 7))) for _ in range(data.draw(st.integers(1, 4)))]
    img.byte_ops.extend(("flip", at, bit) for at, bit in flips)
    return f"bit flips {flips}" + (" (zstd file)" if img.ops_on_wire else "")


def m_splice(img: Image, data) -> str:
    wire_choice(img, data)
    at = near_marks(img, data)
    if data.draw(st.booleans()):
        junk = data.draw(st.binary(min_size=1, max_size=24))
        img.byte_ops.append(("insert", at, junk))
        return f"inserted {junk!r} at {at}"
    n = data.draw(st.integers(1, 24))
    img.byte_ops.append(("delete", at, n))
    return f"deleted {n} bytes at {at}"


def m_zstd_file(img: Image, data) -> str:
    """The stream kind's own: what a zstd file can carry besides the image."""
    if img.kind != "stream":
        return "not a zstd file"
    img.ops_on_wire = True
    how = data.draw(st.sampled_from(["second-frame", "bomb-after", "bomb-instead", "garbage-after"]))
    if how == "second-frame":
        img.byte_ops.append(("append", frame_of(b"junk after the image")))
    elif how == "bomb-after":
        img.byte_ops.append(("append", bomb(declared=False)))
    elif how == "bomb-instead":
        img.byte_ops.append(("truncate", 0))
        img.byte_ops.append(("append", bomb(declared=data.draw(st.booleans()))))
    else:
        img.byte_ops.append(("append", b"\x00" * 100))
    return f"zstd file: {how}"


MUTATORS = [m_header_type, m_header_length, m_xenops, m_xenops, m_parts, m_signature, m_tail,
            m_libxc_headers, m_rec_type, m_rec_type, m_rec_length, m_rec_length, m_rec_resize, m_rec_padding,
            m_rec_order, m_page_record, m_page_record, m_page_record, m_bitmap, m_payload, m_payload, m_payload,
            m_delta, m_delta, m_big_record, m_truncate, m_truncate, m_flip, m_flip, m_splice, m_zstd_file]
BYTE_MUTATORS = (m_truncate, m_flip, m_splice, m_zstd_file)


def mutate(seeds: Seeds, data) -> Image:
    img = copy.deepcopy(seeds.images[data.draw(st.sampled_from(KINDS), label="seed")])
    # A VM of its own, named by the request as a source names it: serve refuses another uuid.
    seed_uuid, img.uuid = img.uuid, str(uuidlib.uuid4())
    for p in img.parts:
        if p.htype == image.XENOPS:
            p.payload = p.payload.replace(seed_uuid.encode(), img.uuid.encode())
    mutators = data.draw(st.lists(st.sampled_from(MUTATORS), min_size=1, max_size=3), label="mutations")
    # Structure first, bytes last: byte offsets are taken on the structure they apply to.
    for m in sorted(mutators, key=lambda m: m in BYTE_MUTATORS):
        note(f"{m.__name__}: {m(img, data)}")
    return img



# The worst inputs, one by one: the memory bound, and the bugs the fuzz found -------------------
def max_records(img: Image, n: int) -> str:
    """n valid COMPRESSED_PAGE_DATA records of the maximum length (16 MiB) in place of the page records."""
    meta = meta_length(1024)
    frame = slow_frame(libxc.MAX_RECORD_BODY - meta, 1024 * 4096)
    s = img.libxc()
    recs = []
    for i in range(n):
        first = (i % 2) * 1024
        head = struct.pack(compressed.HEADER_FORMAT, 1024, compressed.ALGORITHM_ZSTD, 0, 0, len(frame))
        pfns = struct.pack("<1024Q", *range(first, first + 1024))
        recs.append(Rec(compressed.REC_TYPE, head + pfns + bytes(compressed.bitmap_size(1024)) + frame))
    s.records = [r for r in s.records if r.rtype not in (libxc.REC_TYPE_PAGE_DATA, compressed.REC_TYPE)]
    at = next(i for i, r in enumerate(s.records) if r.rtype == libxc.REC_TYPE_STATIC_DATA_END) + 1
    s.records[at:at] = recs
    return f"{n} records of {len(recs[0].body)} bytes"


def every_payload(img: Image, make) -> str:
    for r in records_of(img, (compressed.REC_TYPE,)):
        set_payload(r, make(expected_inflated(r.body)), consistent=True)
    return "every compressed record"


def every_delta_payload(img: Image, make) -> str:
    """Each DELTA_PAGE_DATA frame replaced by make(the bytes it must inflate to), its length in step."""
    for r in records_of(img, (delta.REC_TYPE,)):
        n = struct.unpack_from("<I", r.body)[0]
        payload = make(PAGE_SIZE * n)
        body = bytearray(r.body[:delta.meta_size(n)] + payload)
        struct.pack_into("<I", body, 8, len(payload))
        r.body = bytes(body)
    return "every delta frame replaced"


def set_field(img: Image, rtype: int, offset: int, fmt: str, value: int) -> str:
    r = records_of(img, (rtype,))[0]
    body = bytearray(r.body)
    struct.pack_into(fmt, body, offset, value)
    r.body = bytes(body)
    return f"{libxc.record_name(rtype)} at {offset} = {value:#x}"




def stream_bomb_after(img: Image) -> str:
    """The image and then 1 GiB of zeros, in one zstd frame (about 32 KiB more on the wire)."""
    raw, _ = img.layout()
    cobj = zstandard.ZstdCompressor(level=3).compressobj()
    out = [cobj.compress(raw)] + [cobj.compress(bytes(MIB)) for _ in range(1024)] + [cobj.flush()]
    img.ops_on_wire = True
    img.byte_ops = [("truncate", 0), ("append", b"".join(out))]
    return "1 GiB of zeros after End_of_image, inside the frame"


THREADS_16 = {"XENGUEST_DECOMPRESS_THREADS": "16"}      # as on a 16-core host: the bound must not scale
WORST = {
    # kind, mutation, environment: the inputs with the largest claims a reader could act on
    "xenops-length-2^63-1": ("plain", lambda img: setattr(part(img, image.XENOPS), "length", 2**63 - 1), {}),
    "qemu-length-2^63-1": ("plain", lambda img: setattr(part(img, image.QEMU_TRAD), "length", 2**63 - 1), {}),
    "record-length-2^32-1": ("plain", lambda img: setattr(records_of(img, (libxc.REC_TYPE_PAGE_DATA,))[0],
                                                          "length", 2**32 - 1), {}),
    "record-length-max-then-eof": ("plain", lambda img: img.byte_ops.append(("truncate", 2 * MIB)) or
                                   setattr(records_of(img, (libxc.REC_TYPE_PAGE_DATA,))[0], "length",
                                           libxc.MAX_RECORD_BODY), {}),
    "page-count-2^32-1": ("plain", lambda img: set_field(img, libxc.REC_TYPE_PAGE_DATA, 0, "<I", 2**32 - 1), {}),
    "payload-length-2^32-1": ("inband", lambda img: set_field(img, compressed.REC_TYPE, 12, "<I", 2**32 - 1), {}),
    "zstd-bomb-size-unknown": ("inband", lambda img: every_payload(img, lambda n: bomb(declared=False)), {}),
    "zstd-bomb-size-declared": ("inband", lambda img: every_payload(img, lambda n: bomb(declared=True)), {}),
    "zstd-bomb-size-lies": ("inband", lambda img: every_payload(
        img, lambda n: with_content_size(bomb(declared=True), n)), {}),
    "delta-zstd-bomb-size-unknown": ("delta", lambda img: every_delta_payload(img, lambda n: bomb(declared=False)),
                                     {}),
    "delta-zstd-bomb-size-lies": ("delta", lambda img: every_delta_payload(
        img, lambda n: with_content_size(bomb(declared=True), n)), {}),
    "stream-bomb": ("stream", lambda img: img.byte_ops.extend([("truncate", 0), ("append", bomb(declared=False))])
                    or setattr(img, "ops_on_wire", True), {}),
    "stream-bomb-after-image": ("stream", stream_bomb_after, {}),
    "max-length-records-16-threads": ("inband", lambda img: max_records(img, 16), THREADS_16),
    "memory-64GiB": ("plain", lambda img: setattr(part(img, image.XENOPS), "payload", with_vm(
        {**vm_of(part(img, image.XENOPS).payload), "memory_bytes": 64 << 30})), {}),
    # regressions: bugs the fuzz found
    "xenops-nested-deeply": ("plain", lambda img: setattr(part(img, image.XENOPS), "payload", b"(" * 100_000), {}),
    "stream-data-after-image": ("stream", lambda img: setattr(img, "tail", bytes(MIB)), {}),
}
HARMLESS = {"memory-64GiB", "max-length-records-16-threads"}
