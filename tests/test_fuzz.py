"""Fuzzing the readers of suspend images and libxc streams, through the real executables.

Seeds: valid suspend images of small VMs (8 MiB, profile `mixed`), made once
per module by `xenopsd-shim vm-suspend`: `plain` (PAGE_DATA), `inband`
(`migration-compressor = xenguest`: COMPRESSED_PAGE_DATA records) and
`stream` (`migration-compressor = stream`: the whole image one zstd frame).
Each example parses a seed into its structure (signature, suspend-image
headers and payloads, the Xenops record, the libxc image and domain headers,
libxc records), applies one to three mutations aimed at the fields a reader
must check (header types and lengths, Xenops fields, record types and
lengths, padding and order, PAGE_DATA counts and pfns, the compressed
record's header, bitmap and zstd frame, zstd bombs), plus byte-level ones
(truncation, bit flips, insertions, trailing data) placed mostly at
structure boundaries, and feeds the bytes

  (a) to `xenopsd-shim vm-resume FILE` on a host of its own, and
  (b) to a running `xenopsd-shim serve`, as a migration in xenopsd's protocol: the vm
      and mem PUTs on raw sockets (as transport.open_stream builds them), points 1 and
      1-mem, the image on the mem connection, points 3 and 4. The VM metadata the vm
      connection carries is the image's own Xenops record, as a source sends both.

Checked for every input: no hang (60 s); a failure exits non-zero with one
line on stderr and no traceback, and leaves no domain, no process and no run
file behind; an input that happens to be harmless resumes to a running VM
(destroyed by the test); serve restores an image that vm-resume accepted (the
test commits, the VM runs there, the test destroys it) and refuses one that
vm-resume refused (but for bytes after the first zstd frame, which only
vm-resume's zstd reads), never crashes, logs no traceback, leaves nothing
behind, and answers a new request after every input; and the receiving
processes stay under the memory bound.

Memory bound: the peak RSS (the kernel's high-water mark, VmHWM) of each
process of the receiving side (vm-resume or serve, emu-manager, xenguest,
zstd), read every 20 ms over the process tree while it runs. RSS_BOUND_MIB
bounds the largest of them and TREE_BOUND_MIB the sum of their peaks (an
upper bound of the tree's peak at any one time), whatever the input.
test_worst_inputs runs the worst ones (huge claimed lengths, zstd bombs of
1 GiB, records of the maximum length). Measured on a 2-core machine: a valid
8 MiB restore peaks at about 60 MiB (xenguest); the worst input, 16 MiB
COMPRESSED_PAGE_DATA records that are valid but slow to inflate, at about
130-140 MiB with 16 inflate threads (217 MiB before the restorer bounded its
queue by bytes); a zstd bomb at under 60 MiB.

`make test` runs FUZZ_EXAMPLES examples (15, or $FUZZ_EXAMPLES; derandomized,
so CI is reproducible); `make check-all` adds the slow variant with
FUZZ_EXAMPLES_SLOW random ones. With -s each prints its `fuzz count` and the
peaks it saw.
"""
from __future__ import annotations

import copy
import functools
import json
import os
import random
import socket
import struct
import subprocess
import threading
import time
import uuid as uuidlib
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest
import zstandard
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from conftest import HostDir, Receiver, assert_clean, exe, processes_of
from xenemu import Host
from xenmig import compressed, image, libxc
from xenopsd_shim import transport, zstdframe
from xenopsd_shim.policy import SERVE_ADDRESS

FUZZ_EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", 15))
FUZZ_EXAMPLES_SLOW = 500
TIMEOUT = 60.0
RSS_BOUND_MIB = 200
TREE_BOUND_MIB = 300
MEMORY = 8 << 20
NPAGES = MEMORY >> 12
KINDS = ("plain", "inband", "stream")
MIB = 1 << 20

COUNTS: dict[str, int] = {}
PEAKS: dict[str, tuple[float, str]] = {}      # path -> (MiB, input kind): the largest seen


def count(key: str) -> None:
    COUNTS[key] = COUNTS.get(key, 0) + 1


# The structure of a suspend image ------------------------------------------------
@dataclass
class Rec:
    """A libxc record; `length` and `pad` are set when a mutation makes them lie."""
    rtype: int
    body: bytes
    length: int | None = None
    pad: bytes | None = None

    def encode(self) -> bytes:
        pad = bytes(libxc.padding(len(self.body))) if self.pad is None else self.pad
        return libxc.record_header(self.rtype, len(self.body) if self.length is None else self.length) + self.body + pad


@dataclass
class Stream:
    ihdr: bytes
    dhdr: bytes
    records: list[Rec]


@dataclass
class Part:
    """A suspend-image header and what follows it: a payload, or (Libxc) the libxc stream."""
    htype: int
    payload: bytes = b""
    length: int | None = None
    stream: Stream | None = None


@dataclass
class Image:
    kind: str
    signature: bytes
    parts: list[Part]
    uuid: str
    tail: bytes = b""                          # after End_of_image
    byte_ops: list[tuple] = field(default_factory=list)
    ops_on_wire: bool = False                  # stream kind: byte ops on the zstd file, not the image

    def layout(self) -> tuple[bytes, list[int]]:
        """The image bytes (before any zstd) and the offsets where structures start."""
        chunks, marks, at = [], [], 0

        def put(data: bytes, mark: bool = True) -> None:
            nonlocal at
            if mark:
                marks.append(at)
            chunks.append(data)
            at += len(data)
        put(self.signature)
        for p in self.parts:
            put(image.build_header(p.htype, len(p.payload) if p.length is None else p.length))
            put(p.payload, mark=False)
            if p.stream is not None:
                put(p.stream.ihdr)
                put(p.stream.dhdr)
                for r in p.stream.records:
                    put(r.encode())
        put(self.tail)
        return b"".join(chunks), marks

    def encode(self) -> bytes:
        raw, _ = self.layout()
        if self.kind == "stream" and not self.ops_on_wire:
            raw = apply_ops(raw, self.byte_ops)
        if self.kind == "stream":
            raw = zstandard.ZstdCompressor(level=1).compress(raw)
        if self.kind != "stream" or self.ops_on_wire:
            raw = apply_ops(raw, self.byte_ops)
        return raw

    def libxc(self) -> Stream | None:
        return next((p.stream for p in self.parts if p.stream is not None), None)


def apply_ops(raw: bytes, ops: list[tuple]) -> bytes:
    buf = bytearray(raw)
    for op, *args in ops:
        if op == "truncate":
            del buf[min(args[0], len(buf)):]
        elif op == "flip":
            if buf:
                buf[args[0] % len(buf)] ^= 1 << args[1]
        elif op == "insert":
            buf[args[0]:args[0]] = args[1]
        elif op == "delete":
            del buf[args[0]:args[0] + args[1]]
        elif op == "append":
            buf += args[0]
    return bytes(buf)


def parse_image(raw: bytes, kind: str) -> Image:
    """A seed's structure, read with the project's own header parsers (a seed is valid: they accept it)."""
    image.check_signature(raw[:len(image.SIGNATURE)])
    pos, parts = len(image.SIGNATURE), []
    while True:
        htype, length = image.parse_header(raw[pos:pos + image.HEADER_SIZE])
        pos += image.HEADER_SIZE
        if htype == image.LIBXC:
            stream, pos = parse_libxc(raw, pos)
            parts.append(Part(htype, stream=stream))
        else:
            parts.append(Part(htype, raw[pos:pos + length]))
            pos += length
        if htype == image.END_OF_IMAGE:
            break
    assert pos == len(raw)
    return Image(kind, image.SIGNATURE, parts, vm_of(parts[0].payload)["uuid"])


def vm_of(record: bytes) -> dict:
    """The VM metadata (JSON) that the Xenops record (an S-expression) carries as its vm_str."""
    vm_str = image.parse_xenops_record(record).vm_str
    assert vm_str is not None
    return json.loads(vm_str)


def with_vm(vm: object) -> bytes:
    """A Xenops record as vm-suspend writes it, carrying `vm` (JSON) as its vm_str."""
    return image.build_xenops_record(image.XenopsRecord(image.now(), image.WORD_SIZE, json.dumps(vm), []))


def parse_libxc(raw: bytes, pos: int) -> tuple[Stream, int]:
    ihdr, dhdr = raw[pos:pos + libxc.IHDR_SIZE], raw[pos + libxc.IHDR_SIZE:pos + libxc.IHDR_SIZE + libxc.DHDR_SIZE]
    libxc.parse_image_header(ihdr)
    libxc.parse_domain_header(dhdr)
    pos += libxc.IHDR_SIZE + libxc.DHDR_SIZE
    records = []
    while True:
        rtype, length = libxc.parse_record_header(raw[pos:pos + libxc.RH_SIZE])
        pos += libxc.RH_SIZE
        records.append(Rec(rtype, raw[pos:pos + length]))
        pos += length + libxc.padding(length)
        if rtype == libxc.REC_TYPE_END:
            return Stream(ihdr, dhdr, records), pos


# zstd frames for the compressed record's payload -----------------------------------
def _zeros_frame(size: int, declared: bool) -> bytes:
    """A frame of `size` zero bytes, compressed in chunks (never `size` bytes in memory here)."""
    cctx = zstandard.ZstdCompressor(level=3, write_content_size=declared)
    chunk = bytes(MIB)
    cobj = cctx.compressobj(size=size if declared else -1)
    out = [cobj.compress(chunk) for _ in range(size // MIB)]
    out.append(cobj.flush())
    return b"".join(out)


@functools.cache
def bomb(declared: bool) -> bytes:
    """1 GiB of zeros: about 32 KiB on the wire."""
    return _zeros_frame(1 << 30, declared)


def with_content_size(frame: bytes, size: int) -> bytes:
    """The frame with its Frame_Content_Size field (4 bytes here) rewritten: a lie about its size."""
    fhd = frame[4]
    assert fhd >> 6 == 2 and not fhd & 0x20 and not fhd & 0x3, hex(fhd)   # 4-byte FCS, window byte, no dict
    return frame[:6] + struct.pack("<I", size) + frame[10:]


def frame_of(data: bytes, **kw) -> bytes:
    """A frame as the sender writes one (content size and checksum) unless `kw` says otherwise."""
    return zstandard.ZstdCompressor(level=1, **{"write_checksum": True, **kw}).compress(data)


def page_fields(r: Rec) -> tuple[int, int]:
    """(offset of the pfn entries, their count) in a PAGE_DATA or COMPRESSED_PAGE_DATA body."""
    offset = libxc.PAGE_DATA_SIZE if r.rtype == libxc.REC_TYPE_PAGE_DATA else compressed.HEADER_SIZE
    n = struct.unpack_from("<I", r.body)[0] if len(r.body) >= 4 else 0
    return offset, max(0, min(n, (len(r.body) - offset) // 8))


def expected_inflated(body: bytes) -> int:
    """What a compressed record's frame must inflate to, from its (possibly mutated) header."""
    try:
        count, _, _, zero_count, _ = struct.unpack_from(compressed.HEADER_FORMAT, body)
        entries = struct.unpack_from(f"<{count}Q", body, compressed.HEADER_SIZE)
    except struct.error:
        return 0
    data = sum(1 for e in entries if e >> 60 not in libxc.PFINFO_NO_DATA)
    return max(0, 4096 * (data - zero_count))


def set_payload(r: Rec, payload: bytes, consistent: bool) -> None:
    """Replace a compressed record's frame; `consistent` keeps payload_length and the body in step."""
    count = struct.unpack_from("<I", r.body)[0]
    meta = compressed.HEADER_SIZE + 8 * count + compressed.bitmap_size(count)
    body = r.body[:meta] + payload
    if consistent and len(body) >= 16:
        body = body[:12] + struct.pack("<I", len(payload)) + body[16:]
    r.body = body


# Mutations: each takes the image and hypothesis' data, returns what it did ------------
def u(bits: int) -> st.SearchStrategy[int]:
    top = (1 << bits) - 1
    return st.one_of(st.sampled_from([0, 1, 2, 3, 0x7F, 0xFF, top, top >> 1, (top >> 1) + 1]), st.integers(0, top))


def pick(data, items: list, what: str):
    return data.draw(st.sampled_from(items), label=what) if items else None


def records_of(img: Image, types: tuple[int, ...] | None = None) -> list[Rec]:
    s = img.libxc()
    return [r for r in s.records if types is None or r.rtype in types] if s else []


HEADER_TYPES = [*image.NAMES, 0, 1, 0xFF, 0x0F12, 0x10000, -1, -image.XENOPS, 2**63 - 1, -2**63]


def m_header_type(img: Image, data) -> str:
    p = pick(data, img.parts, "part")
    old, p.htype = p.htype, data.draw(st.one_of(st.sampled_from(HEADER_TYPES), st.integers(-2**63, 2**63 - 1)))
    return f"suspend header type {image.name(old)} -> {p.htype:#x}"


def m_header_length(img: Image, data) -> str:
    p = pick(data, img.parts, "part")
    n = len(p.payload)
    p.length = data.draw(st.one_of(
        st.sampled_from([0, 1, -1, n - 1, n + 1, n + 4096, image.MAX_XENOPS_RECORD, image.MAX_XENOPS_RECORD + 1,
                         2**31, 2**62, 2**63 - 1, -2**63]),
        st.integers(-2**63, 2**63 - 1)))
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


IHDR_WIDTHS = (64, 32, 32, 16, 16, 32)
DHDR_WIDTHS = (32, 16, 16, 32, 32)


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


def m_rec_type(img: Image, data) -> str:
    r = pick(data, records_of(img), "record")
    if r is None:
        return "no records"
    old, r.rtype = r.rtype, data.draw(st.one_of(st.sampled_from(REC_TYPES), st.integers(0, 2**32 - 1)))
    return f"record type {libxc.record_name(old)} -> {r.rtype:#x}"


def m_rec_length(img: Image, data) -> str:
    r = pick(data, records_of(img), "record")
    if r is None:
        return "no records"
    n = len(r.body)
    r.length = data.draw(st.one_of(
        st.sampled_from([x for x in (0, 1, n - 1, n + 1, n - 8, n + 8, n + 4096, libxc.MAX_RECORD_BODY,
                                     libxc.MAX_RECORD_BODY + 1, 2**31, 2**32 - 1) if 0 <= x < 2**32]),
        st.integers(0, 2**32 - 1)))
    return f"{libxc.record_name(r.rtype)} length field {n} -> {r.length}"


def m_rec_resize(img: Image, data) -> str:
    r = pick(data, records_of(img), "record")
    if r is None:
        return "no records"
    n = len(r.body)
    new = data.draw(st.one_of(st.sampled_from([0, 1, 8, 16, max(0, n - 4096), max(0, n - 1), n + 1, n + 4096]),
                              st.integers(0, n + 64)))
    r.body = r.body[:new] + bytes(max(0, new - n))
    return f"{libxc.record_name(r.rtype)} body {n} -> {new} bytes (length field in step)"


def m_rec_padding(img: Image, data) -> str:
    r = pick(data, records_of(img), "record")
    if r is None:
        return "no records"
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
    return st.one_of(st.sampled_from(
        [NPAGES, NPAGES - 1, NPAGES + 1, libxc.PFN_MASK, 2**64 - 1, pfn | 1 << 52, pfn | 1 << 59, 0]
        + [pfn | t << 60 for t in range(16)]), st.integers(0, 2**64 - 1))


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
        width = 8 * struct.calcsize("<" + fmt[1 + i])
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
    count = struct.unpack_from("<I", r.body)[0]
    meta = compressed.HEADER_SIZE + 8 * count + compressed.bitmap_size(count)
    payload = r.body[meta:]
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
        skip = struct.pack("<II", 0x184D2A50 + rng.randrange(16), 8) + bytes(8)
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
        meta = compressed.HEADER_SIZE + 8 * 1024 + compressed.bitmap_size(1024)
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
            m_big_record, m_truncate, m_truncate, m_flip, m_flip, m_splice, m_zstd_file]
BYTE_MUTATORS = (m_truncate, m_flip, m_splice, m_zstd_file)


# Running the receiving side ----------------------------------------------------------
def vm_hwm_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def role(proc: psutil.Process) -> str:
    try:
        cmd = proc.cmdline()
    except psutil.Error:
        return "?"
    names = [os.path.basename(c) for c in cmd[:2]]
    return names[1] if len(names) > 1 and names[0].startswith("python") else names[0] if names else "?"


class PeakRss:
    """Per-process peak RSS (VmHWM, kept by the kernel) of a process tree, read every 20 ms
    while it runs; a process is missed only if it lives less than one period."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peaks: dict[int, tuple[str, int]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            self.sample()
            if self._stop.wait(0.02):
                return

    def sample(self) -> None:
        try:
            root = psutil.Process(self.pid)
            tree = [root, *root.children(recursive=True)]
        except psutil.Error:
            return
        for proc in tree:
            kib = vm_hwm_kib(proc.pid)
            name = self.peaks.get(proc.pid, (None, 0))[0] or role(proc)
            if kib >= self.peaks.get(proc.pid, ("", 0))[1]:
                self.peaks[proc.pid] = (name, kib)

    def stop(self) -> dict[str, float]:
        self.sample()
        self._stop.set()
        self._thread.join()
        return self.summary()

    def summary(self) -> dict[str, float]:
        by_role: dict[str, float] = {}
        for name, kib in self.peaks.values():
            by_role[name] = max(by_role.get(name, 0), kib / 1024)
        return by_role

    def tree_mib(self) -> float:
        return sum(kib for _, kib in self.peaks.values()) / 1024


def check_memory(path: str, kind: str, peaks: dict[str, float], tree: float) -> None:
    worst = max(peaks.values(), default=0.0)
    if worst > PEAKS.get(path, (0.0, ""))[0]:
        PEAKS[path] = (worst, f"{kind}: {max(peaks, key=peaks.get)}")
    assert worst < RSS_BOUND_MIB, f"{path}: peak RSS {peaks} MiB over the bound of {RSS_BOUND_MIB} MiB ({kind})"
    assert tree < TREE_BOUND_MIB, f"{path}: process tree peaks sum to {tree:.0f} MiB ({kind})"


def kill_tree(pid: int) -> None:
    try:
        root = psutil.Process(pid)
        procs = [*root.children(recursive=True), root]
    except psutil.Error:
        return
    for p in procs:
        try:
            p.kill()
        except psutil.Error:
            pass


def domains_of(root: Path) -> list[dict]:
    """What `xenemu list` and `xenopsd-shim vm-list` read (the CLIs are run once per test, not per input)."""
    return [d.describe() for d in Host(root).domains()]


def no_domains_cli(h: HostDir) -> None:
    assert h.vms() == []
    assert json.loads(h.xenemu("list", "--json")) == []


@dataclass
class Outcome:
    ok: bool                 # resumed / migrated: the VM runs
    detail: str
    peak: dict[str, float]
    tree: float
    accepted: bool = False   # serve: restored the whole image (its first Success), commit or not


def resume(h: HostDir, path: Path, kind: str) -> Outcome:
    """`xenopsd-shim vm-resume FILE`; a success is checked and its VM destroyed."""
    proc = subprocess.Popen([exe("xenopsd-shim"), "vm-resume", str(path)], env=h.env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    rss = PeakRss(proc.pid)
    try:
        out, err = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        proc.communicate()
        rss.stop()
        pytest.fail(f"vm-resume hung for {TIMEOUT:g} s")
    peak = rss.stop()
    check_memory("vm-resume", kind, peak, rss.tree_mib())
    assert "Traceback" not in err, err
    doms = domains_of(h.root)
    if proc.returncode == 0:
        assert err == "", err
        [d] = doms
        assert d["uuid"] == out.strip() and d["state"] == "running", (d, out)
        Host(h.root).find(d["uuid"]).destroy()
        assert domains_of(h.root) == []
    else:
        lines = err.splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("xenopsd-shim: "), \
            (proc.returncode, err)
        assert doms == [], f"failed resume left {doms}"
    assert_clean(h.root)
    return Outcome(proc.returncode == 0, err.strip() or out.strip(), peak, rss.tree_mib())


class Serve:
    """A `xenopsd-shim serve` (the conftest fixture), its process tree's memory and its clean state."""

    def __init__(self, h: HostDir, receiver) -> None:
        self.h = h
        self.r = receiver(h)
        self.rss = PeakRss(self.r.proc.pid)

    def alive(self) -> None:
        """The receiver still runs, logged no traceback, and answers a new request."""
        assert self.r.proc.poll() is None, f"serve died: {self.r.log[-2000:]}"
        assert "Traceback" not in self.r.log and "Exception in thread" not in self.r.log, self.r.log[-3000:]
        with socket.create_connection(self.addr(), timeout=TIMEOUT) as s:
            s.sendall(b"GET /services/xenops/nothing HTTP/1.1\r\nHost: x\r\n\r\n")
            assert recv_until(s, b"\r\n\r\n", time.monotonic() + TIMEOUT).startswith(b"HTTP/1.1 404 ")

    def addr(self) -> tuple[str, int]:
        host, port = self.r.address.rsplit(":", 1)
        return host, int(port)

    def clean(self) -> None:
        """Nothing of the host left but `serve` itself and its address file."""
        deadline = time.monotonic() + 15
        while True:
            left = [p for p in processes_of(self.h.root) if p.pid != self.r.proc.pid]
            files = [f for f in (self.h.root / "run").glob("*") if f.name != SERVE_ADDRESS]
            if not left and not files:
                return
            assert time.monotonic() < deadline, f"left behind: {[p.cmdline() for p in left]}, {files}"
            time.sleep(0.1)

    def migrate(self, raw: bytes, img: Image, commit: bool) -> Outcome:
        """Migrate the image in as a source would; `commit`: send point 3 after the image, else
        close our side after it (a source that is gone), so a reader waiting for more sees the end."""
        before = dict(self.rss.peaks)
        deadline = time.monotonic() + TIMEOUT
        log = self.h.root / "xenopsd.log"
        log_from = log.stat().st_size if log.exists() else 0     # a source port recurs in a long run
        meta, limit = vm_metadata(img)
        dest_id = img.uuid[:24] + "000000000001"
        cookies = migration_cookies(img)
        vm = socket.create_connection(self.addr(), timeout=TIMEOUT)
        socks = [vm]
        tag = f"receiver[127.0.0.1:{vm.getsockname()[1]}]"
        lines: list[str] = []
        ok = False
        try:
            vm.sendall(transport.build_request("PUT", transport.MIGRATE_VM_PATH + dest_id, self.r.address,
                                               vm_cookies(cookies, meta, limit)))
            lines.append(hs_recv(vm, deadline) or "<closed>")     # point 1 (a head too long: no answer)
            if lines[-1] == "Success" and vgpu_of(meta):
                # A source with a vGPU: its connection (empty here; the image has no Demu stream).
                vg = socket.create_connection(self.addr(), timeout=TIMEOUT)
                socks.append(vg)
                vg.sendall(transport.build_request("PUT", f"{transport.MIGRATE_VGPU_PATH}{dest_id}.0", self.r.address,
                                                   {**cookies, transport.COOKIE_VGPU_MIGRATION: ""}))
                assert hs_recv(vg, deadline) == "Success"
                vm.sendall(transport.build_result(None))         # 1-vgpu ACK (serve waits for it before point 1)
                lines.append(hs_recv(vm, deadline) or "<closed>")
            if lines[-1] == "Success":
                mem = socket.create_connection(self.addr(), timeout=TIMEOUT)
                socks.append(mem)
                mem.sendall(transport.build_request("PUT", transport.MIGRATE_MEM_PATH + dest_id, self.r.address,
                                                    cookies))
                assert hs_recv(mem, deadline) == "Success"        # 1-mem
                vm.sendall(transport.build_result(None))         # 1-mem ACK
                # A partial line and then the end of the connection used to make the receiver
                # busy-wait (test_serve_notices_a_partial_line_then_close): bytes after the frame
                # that its relay feeds zstd end here, as a source's stream would.
                sender = threading.Thread(target=send_image, args=(socks[1:], raw), daemon=True)
                sender.start()
                sender.join(timeout=TIMEOUT)
                assert not sender.is_alive(), "our sender is stuck: the receiver stopped reading"
                if commit:
                    try:
                        vm.sendall(transport.build_result(None))     # point 3
                    except OSError:
                        pass          # it gave up early: its error is there to read
                else:
                    vm.shutdown(socket.SHUT_WR)
                while (answer := hs_recv(vm, deadline)) is not None:
                    lines.append(answer)
                    if answer == "Success" and commit:
                        ok = True                                 # point 4
                        break
        finally:
            for sock in socks:
                sock.close()
        # This input's processes (those whose peak moved meanwhile), and serve itself.
        self.rss.sample()
        now = dict(self.rss.peaks)          # a copy: the sampler thread goes on adding to it
        mine = {pid for pid, v in now.items() if before.get(pid) != v} | {self.r.proc.pid}
        peaks: dict[str, float] = {}
        for pid in mine & now.keys():
            name, kib = now[pid]
            peaks[name] = max(peaks.get(name, 0.0), kib / 1024)
        tree = sum(now[pid][1] for pid in mine & now.keys()) / 1024
        check_memory("serve", img.kind, peaks, tree)
        failure = [x for x in lines if x.startswith("Error: ")]
        assert len(failure) <= 1 and all("\n" not in x for x in failure), lines
        doms = domains_of(self.h.root)
        if ok:
            [d] = doms
            assert d["state"] == "running", d
            Host(self.h.root).find(d["uuid"]).destroy()
        else:
            assert doms == [], f"failed migration left {doms}: {lines}"
        self.clean()
        self.alive()
        # Restored the whole image? Its log says so (xenopsd's receiver says nothing between
        # point 1 and point 4).
        with log.open("rb") as f:
            f.seek(log_from)
            mine = [x for x in f.read().decode(errors="replace").splitlines() if f" {tag} " in x]
        warnings = [x for x in mine if f" {tag} warning: " in x]
        accepted = any("synchronisation point 2: image restored" in x for x in mine)
        return Outcome(ok, " | ".join(lines + warnings[-1:])[:400], peaks, tree, accepted=accepted)


def recv_some(sock: socket.socket, deadline: float) -> bytes:
    left = deadline - time.monotonic()
    if left <= 0:
        pytest.fail(f"the receiver hung: no answer within {TIMEOUT:g} s")
    sock.settimeout(left)
    try:
        return sock.recv(65536)
    except (socket.timeout, TimeoutError):
        pytest.fail(f"the receiver hung: no answer within {TIMEOUT:g} s")


def recv_until(sock: socket.socket, end: bytes, deadline: float) -> bytes:
    data = b""
    while end not in data:
        chunk = recv_some(sock, deadline)
        if not chunk:
            break
        data += chunk
    return data


def send_image(socks: list[socket.socket], raw: bytes) -> None:
    """The image on the mem connection (the last), then the end of it and of the vGPU one, as
    VM_migrate's save ends them."""
    try:
        socks[-1].sendall(raw)
    except OSError:
        pass        # the receiver gave up on the image and closed: its answer says why
    for sock in socks:
        try:
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass


def hs_recv(sock: socket.socket, deadline: float) -> str | None:
    """One handshake message ("Success", "Error: <text>"), or None once the receiver closed."""
    head = recv_n(sock, transport.HANDSHAKE.size, deadline)
    if head is None:
        return None
    (length,) = transport.HANDSHAKE.unpack(head)
    text = recv_n(sock, length, deadline) if length else b""
    if text is None:
        return None
    return "Success" if length == 0 else "Error: " + text.decode(errors="replace")


def recv_n(sock: socket.socket, n: int, deadline: float) -> bytes | None:
    data = b""
    while len(data) < n:
        left = deadline - time.monotonic()
        if left <= 0:
            pytest.fail(f"the receiver hung: no answer within {TIMEOUT:g} s")
        sock.settimeout(left)
        try:
            chunk = sock.recv(n - len(data))
        except (socket.timeout, TimeoutError):
            pytest.fail(f"the receiver hung: no answer within {TIMEOUT:g} s")
        except ConnectionResetError:
            return None
        if not chunk:
            return None
        data += chunk
    return data


def migration_cookies(img: Image) -> dict[str, str]:
    """The cookies every connection of a migration carries, as a source sends them."""
    return {transport.COOKIE_DBG: "fuzz", transport.COOKIE_FINAL_ID: img.uuid, transport.COOKIE_MEM_MIGRATION: "fuzz",
            **({transport.COOKIE_COMPRESS: transport.COMPRESS_ZSTD} if img.kind == "stream" else {})}


def vm_cookies(cookies: dict[str, str], meta: str, limit: int) -> dict[str, str]:
    """The vm connection's: the migration's, the memory to allocate and the VM's metadata."""
    return {**cookies, transport.COOKIE_MEMORY_LIMIT: str(limit), transport.METADATA_COOKIE: meta}


def vm_metadata(img: Image) -> tuple[str, int]:
    """The vm connection's metadata and memory_limit: the vm_str of the image's own Xenops record (a
    source sends both from the same VM; a mangled record is sent as it is), or a seed's when the
    image has none."""
    xen = [p for p in img.parts if p.htype == image.XENOPS]
    if len(xen) == 1:
        try:
            meta = image.parse_xenops_record(xen[0].payload).vm_str or ""
        except image.ImageError:
            meta = xen[0].payload.decode(errors="replace")
        try:
            rec = json.loads(meta)
            limit = rec["memory_bytes"] if isinstance(rec, dict) and isinstance(rec.get("memory_bytes"), int) \
                and 0 < rec["memory_bytes"] < 1 << 40 else MEMORY
        except (ValueError, RecursionError):
            limit = MEMORY
        return meta, limit
    return json.dumps({"name": "vm-fuzz", "uuid": img.uuid, "memory_bytes": MEMORY, "workload": "none",
                       "vgpu_bytes": 0}), MEMORY


def wait_for_log(h: HostDir, text: str, deadline: float) -> None:
    while text not in (h.root / "xenopsd.log").read_text(errors="replace"):
        if time.monotonic() > deadline:
            pytest.fail(f"the receiver never logged {text!r}")
        time.sleep(0.05)


def vgpu_of(meta: str) -> bool:
    try:
        rec = json.loads(meta)
    except (ValueError, RecursionError):
        return False
    return isinstance(rec, dict) and bool(rec.get("vgpu_bytes"))


# Seeds and the fuzz loop ---------------------------------------------------------------
@dataclass
class Seeds:
    images: dict[str, Image]


@pytest.fixture(scope="module")
def seeds(tmp_path_factory) -> Seeds:
    root = tmp_path_factory.mktemp("fuzz-seeds")
    h = HostDir(root)
    check = HostDir(root / "check")
    check.root.mkdir()
    images = {}
    for kind, compressor in (("plain", None), ("inband", "xenguest"), ("stream", "stream")):
        if compressor:
            (root / "xenopsd.conf").write_text(f"migration-compressor = {compressor}\n")
        h.shim("vm-create", f"vm-{kind}", "--memory", f"{MEMORY >> 20}M", "--image", "mixed")
        digests = h.shim("vm-digest", f"vm-{kind}", "--pages").stdout
        path = root / f"{kind}.img"
        h.shim("vm-suspend", f"vm-{kind}", "--to", str(path), *(["--compress"] if compressor else []))
        # A seed restores page for page (the restorer's inflate queue included).
        check.shim("vm-resume", str(path))
        assert check.shim("vm-digest", f"vm-{kind}", "--pages").stdout == digests
        check.shim("vm-destroy", f"vm-{kind}")
        raw = path.read_bytes()
        if kind == "stream":
            assert raw[:4] == b"\x28\xb5\x2f\xfd"
            raw = zstandard.ZstdDecompressor().decompressobj().decompress(raw)
        images[kind] = img = parse_image(raw, kind)
        round_trips = kind == "stream" or img.encode() == path.read_bytes()
        assert round_trips, f"the {kind} seed's model does not give back its bytes"
        types = {r.rtype for r in img.libxc().records}
        assert (compressed.REC_TYPE in types) == (kind == "inband"), types
    assert_clean(root)
    assert_clean(check.root)
    return Seeds(images)


def mutate(seeds: Seeds, data) -> Image:
    img = copy.deepcopy(seeds.images[data.draw(st.sampled_from(KINDS), label="seed")])
    # A VM of its own, named by the request as a source names it: serve refuses another uuid.
    seed_uuid, img.uuid = img.uuid, str(uuidlib.uuid4())
    for part in img.parts:
        if part.htype == image.XENOPS:
            part.payload = part.payload.replace(seed_uuid.encode(), img.uuid.encode())
    mutators = data.draw(st.lists(st.sampled_from(MUTATORS), min_size=1, max_size=3), label="mutations")
    # Structure first, bytes last: byte offsets are taken on the structure they apply to.
    for m in sorted(mutators, key=lambda m: m in BYTE_MUTATORS):
        note(f"{m.__name__}: {m(img, data)}")
    return img


def reset(h: HostDir, keep: int | None = None) -> None:
    """What an earlier failing input left is gone, so that each example (and its shrinks) starts alike."""
    for d in Host(h.root).domains():
        d.destroy()
    for p in processes_of(h.root):
        if p.pid != keep:
            p.kill()


def exercise(seeds: Seeds, data, resume_host: HostDir, serve: Serve, tmp: Path) -> None:
    reset(resume_host)
    reset(serve.h, keep=serve.r.proc.pid)
    img = mutate(seeds, data)
    raw = img.encode()
    path = tmp / "fuzz.img"
    path.write_bytes(raw)
    note(f"{img.kind} image of {len(raw)} bytes")
    a = resume(resume_host, path, img.kind)
    count("resume")
    count(f"resume {'ok' if a.ok else 'refused'}")
    note(f"vm-resume: {a.detail}")
    b = serve.migrate(raw, img, commit=a.ok)
    count("serve")
    count(f"serve {'ok' if b.ok else 'refused'}")
    note(f"serve: {b.detail}")
    # Both read the image with the same ImageReader: the same verdict on it, except that serve
    # relays one zstd frame where vm-resume's zstd reads the whole file. (Bytes after End_of_image
    # can still fail the commit: serve reads them as the source's handshake line.)
    kind, resumed, accepted = img.kind, a.ok, b.accepted      # (no image in pytest's assertion report)
    if resumed:
        assert accepted, f"vm-resume accepted the image, serve refused it: {b.detail}"
    elif accepted:
        assert kind == "stream", f"serve accepted the image, vm-resume refused it: {a.detail}"


def report(test: str, started: float) -> None:
    took = time.monotonic() - started
    print(f"\nfuzz count ({test}): resume {COUNTS.get('resume', 0)} ({COUNTS.get('resume ok', 0)} resumed), "
          f"serve {COUNTS.get('serve', 0)} ({COUNTS.get('serve ok', 0)} migrated) in {took:.0f} s; "
          + "; ".join(f"peak RSS {path} {mib:.0f} MiB ({what})" for path, (mib, what) in sorted(PEAKS.items())))


FUZZ_SETTINGS = dict(deadline=None, database=None, print_blob=True,
                     suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                            HealthCheck.large_base_example])


def run_fuzz(name: str, config: settings, seeds: Seeds, hosts, receiver, tmp_path: Path, record_property) -> None:
    COUNTS.clear()
    started = time.monotonic()
    resume_host, serve_host = hosts("resume"), hosts("serve")
    serve = Serve(serve_host, receiver)

    @config
    @given(data=st.data())
    def fuzz(data) -> None:
        exercise(seeds, data, resume_host, serve, tmp_path)

    try:
        fuzz()
        # Still a working receiver: a valid image migrates.
        img = seeds.images["inband"]
        last = serve.migrate(img.encode(), img, commit=True)
        assert last.ok, last.detail
        no_domains_cli(resume_host)
        no_domains_cli(serve_host)
    finally:
        serve.rss.stop()
        report(name, started)
    record_property("fuzz_count", COUNTS.get("resume", 0))
    assert COUNTS["resume"] >= config.max_examples and COUNTS["serve"] >= config.max_examples, COUNTS


def test_fuzz_resume_and_serve(seeds, hosts, receiver, tmp_path, record_property):
    run_fuzz("default", settings(max_examples=FUZZ_EXAMPLES, derandomize=True, **FUZZ_SETTINGS),
             seeds, hosts, receiver, tmp_path, record_property)


@pytest.mark.slow
def test_fuzz_resume_and_serve_many(seeds, hosts, receiver, tmp_path, record_property):
    run_fuzz("slow", settings(max_examples=FUZZ_EXAMPLES_SLOW, **FUZZ_SETTINGS),
             seeds, hosts, receiver, tmp_path, record_property)


@pytest.mark.parametrize("where", ["request", "commit"])
def test_serve_notices_a_partial_message_then_close(seeds, hosts, where):
    """A request cut short, or half a handshake message (one byte of point 3's two) and then the
    end of the connection: the receiver notices at once, answers with its error, keeps nothing."""
    h = hosts("serve")
    serve = Serve(h, lambda host: Receiver(host))
    img = seeds.images["plain"]
    meta, limit = vm_metadata(img)
    dest_id = img.uuid[:24] + "000000000001"
    cookies = migration_cookies(img)
    deadline = time.monotonic() + TIMEOUT
    try:
        with socket.create_connection(serve.addr(), timeout=TIMEOUT) as sock:
            if where == "request":
                head = transport.build_request("PUT", transport.MIGRATE_VM_PATH + dest_id, "x", {})
                sock.sendall(head[:head.index(b"Host: x") + len(b"Host: x")])     # cut in its Host line
            else:
                sock.sendall(transport.build_request("PUT", transport.MIGRATE_VM_PATH + dest_id, "x",
                                                     vm_cookies(cookies, meta, limit)))
                assert hs_recv(sock, deadline) == "Success"
                with socket.create_connection(serve.addr(), timeout=TIMEOUT) as mem:
                    mem.sendall(transport.build_request("PUT", transport.MIGRATE_MEM_PATH + dest_id, "x", cookies))
                    assert hs_recv(mem, deadline) == "Success"
                    sock.sendall(transport.build_result(None))
                    send_image([mem], img.encode())
                    wait_for_log(h, "synchronisation point 2: image restored", deadline)
                sock.sendall(b"\x00")
            sock.shutdown(socket.SHUT_WR)
            sock.settimeout(3)
            rest = b""
            try:
                while chunk := sock.recv(4096):
                    rest += chunk
            except ConnectionResetError:
                pass        # it closed with our partial message unread: it noticed
            except (socket.timeout, TimeoutError):
                pytest.fail(f"the receiver did not notice within 3 s that the peer closed ({where})")
        assert where == "request" or b"Internal_error" in rest, rest
        serve.clean()
        assert domains_of(h.root) == []
        serve.alive()
    finally:
        serve.rss.stop()
        serve.r.proc.kill()
        serve.r.proc.wait()
        (h.root / "run" / SERVE_ADDRESS).unlink(missing_ok=True)
        reset(h)


# The worst inputs, one by one: the memory bound, and the bugs the fuzz found -------------------
def slow_frame(length: int, expected: int) -> bytes:
    """A valid frame of `expected` random bytes, padded with empty raw blocks to `length` bytes: as long
    as a record may be, and slow to inflate (40 ms), so that a restorer's queue fills with such records."""
    def block(last: int, size: int) -> bytes:
        return (last | size << 3).to_bytes(3, "little")
    rng = random.Random(1)
    content = rng.randbytes(expected)
    # 4-byte size, content checksum, 128 KiB window
    head = struct.pack("<IBBI", zstdframe.FRAME_MAGIC, 0x84, (17 - 10) << 3, expected)
    data = b"".join(block(0, 128 << 10) + content[at:at + (128 << 10)] for at in range(0, expected, 128 << 10))
    checksum = zstandard.ZstdCompressor(write_checksum=True).compress(content)[-4:]   # XXH64 of the content
    empty = (length - len(head) - len(data) - 3 - 4) // 3
    frame = head + block(0, 0) * empty + data + block(1, 0) + checksum
    assert len(frame) <= length
    return frame


def max_records(img: Image, n: int) -> str:
    """n valid COMPRESSED_PAGE_DATA records of the maximum length (16 MiB) in place of the page records."""
    meta = compressed.HEADER_SIZE + 8 * 1024 + compressed.bitmap_size(1024)
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


def set_field(img: Image, rtype: int, offset: int, fmt: str, value: int) -> str:
    r = records_of(img, (rtype,))[0]
    body = bytearray(r.body)
    struct.pack_into(fmt, body, offset, value)
    r.body = bytes(body)
    return f"{libxc.record_name(rtype)} at {offset} = {value:#x}"


def part(img: Image, htype: int) -> Part:
    return next(p for p in img.parts if p.htype == htype)


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


@pytest.mark.parametrize("name", sorted(WORST))
def test_worst_inputs(seeds, hosts, receiver, tmp_path, name):
    """Each input fails cleanly (or, if harmless, resumes) on both paths, within the memory bound."""
    kind, mutation, env = WORST[name]
    img = copy.deepcopy(seeds.images[kind])
    mutation(img)
    raw = img.encode()
    path = tmp_path / "worst.img"
    path.write_bytes(raw)
    serve_host, resume_host = hosts("serve"), hosts("resume")
    for h in (serve_host, resume_host):
        h.env.update(env)
    serve = Serve(serve_host, receiver)
    try:
        started = time.monotonic()
        a = resume(resume_host, path, kind)
        b = serve.migrate(raw, img, commit=a.ok)
        took = time.monotonic() - started
    finally:
        serve.rss.stop()
    print(f"\n{name}: {len(raw)} bytes, {took:.1f} s; vm-resume {'ok' if a.ok else 'refused'}, "
          f"peak RSS {max(a.peak.values()):.0f} MiB ({max(a.peak, key=a.peak.get)}), tree {a.tree:.0f} MiB; "
          f"serve {'ok' if b.ok else 'refused'}, peak RSS {max(b.peak.values()):.0f} MiB "
          f"({max(b.peak, key=b.peak.get)}), tree {b.tree:.0f} MiB\n  {a.detail[:200]}\n  {b.detail[:200]}")
    assert a.ok == (name in HARMLESS), a.detail
    assert b.ok == a.ok, b.detail
    # The other reader of images: xenguest -mode inspect, one record at a time.
    with open(path, "rb") as f:
        proc = resume_host.run("xenguest", "-mode", "inspect", "-fd", "0", stdin=f, stdout=subprocess.DEVNULL,
                               check=False, timeout=TIMEOUT)
    assert "Traceback" not in proc.stderr and proc.returncode in (0, 2), proc.stderr[-2000:]
    assert proc.returncode == 0 or len(proc.stderr.splitlines()) == 1, proc.stderr
