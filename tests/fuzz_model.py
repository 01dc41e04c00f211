"""The fuzz's model of a suspend image: its structure, read from a seed and written back with lies.

A seed (a valid image) parses into parts, the libxc stream and its records with the project's own
header parsers and builders (xenmig.image, xenmig.libxc, xenmig.compressed, xenopsd_shim.zstdframe);
mutations then edit the structure, and `Image.encode` writes it back, lies included (a length
field, padding, bytes after the end, byte-level edits before or after zstd). The frame helpers make
the zstd payloads a reader must refuse or bound: bombs, lying size fields, slow frames.
"""
from __future__ import annotations

import copy
import functools
import json
import random
import struct
from dataclasses import dataclass, field

import zstandard

from xenemu.memory import PAGE_SIZE
import numpy as np

from xenmig import compressed, delta, image, imagewalk, libxc, libxcwalk
from xenopsd_shim import zstdframe

MEMORY = 8 << 20                   # the seeds' VMs
NPAGES = MEMORY // PAGE_SIZE
KINDS = ("plain", "inband", "stream", "delta")
DELTA_PAGES = 64                   # the delta seed re-sends this many pages, changed, then back
MIB = 1 << 20


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
    """The libxc stream: its image and domain headers (raw, so a mutation may make them lie) and records."""
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
    """A suspend image of one seed kind, and the byte-level edits to make when it is encoded."""
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
    """The byte-level mutations (truncate, flip, insert, delete, append), in order."""
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
    """A seed's structure, read by the project's own walker with every rule (a seed is valid)."""
    parts: list[Part] = []
    walked = imagewalk.parse(raw, restore=True)
    for item in walked:
        if isinstance(item, libxcwalk.Parsed):
            parts[-1].stream = Stream(item.headers.raw[:libxc.IHDR_SIZE], item.headers.raw[libxc.IHDR_SIZE:],
                                      [Rec(rtype, body) for _, rtype, body in item.records])
        else:
            parts.append(Part(item.htype, item.payload))
    last = walked[-1]
    assert isinstance(last, imagewalk.Header) and last.offset + image.HEADER_SIZE == len(raw)
    return Image(kind, image.SIGNATURE, parts, vm_of(parts[0].payload)["uuid"])


def vm_of(record: bytes) -> dict:
    """The VM metadata (JSON) that the Xenops record (an S-expression) carries as its vm_str."""
    vm_str = image.parse_xenops_record(record).vm_str
    assert vm_str is not None
    return json.loads(vm_str)


def with_vm(vm: object) -> bytes:
    """A Xenops record as vm-suspend writes it, carrying `vm` (JSON) as its vm_str."""
    return image.build_xenops_record(image.XenopsRecord(image.now(), image.WORD_SIZE, json.dumps(vm), []))


def records_of(img: Image, types: tuple[int, ...] | None = None) -> list[Rec]:
    """The libxc records of `types` (all without), in stream order."""
    s = img.libxc()
    return [r for r in s.records if types is None or r.rtype in types] if s else []


def part(img: Image, htype: int) -> Part:
    """The first suspend-image part of type `htype`."""
    return next(p for p in img.parts if p.htype == htype)


def with_deltas(inband: Image) -> Image:
    """The inband seed with DELTA_PAGE_DATA records after its page records: the first DELTA_PAGES
    pages of its first compressed record re-sent with byte 0 incremented, then re-sent as they
    were (so the seed restores to the same pages, and every delta has a base and both crcs)."""
    img = copy.deepcopy(inband)
    img.kind = "delta"
    records = img.libxc().records
    first = next(r for r in records if r.rtype == compressed.REC_TYPE)
    pfns, frames = compressed.decode_frames(first.body, NPAGES)
    pfns, bases = pfns[:DELTA_PAGES], frames[:DELTA_PAGES]
    changed = bases.copy()
    changed[:, 0] += 1
    frame = zstandard.ZstdCompressor(level=1, write_checksum=True, write_content_size=True).compress
    deltas = [Rec(delta.REC_TYPE, b"".join(bytes(b) for b in delta.build(pfns, new, old, frame)[0][1:3]))
              for new, old in ((changed, bases), (bases, changed))]
    last = max(i for i, r in enumerate(records) if r.rtype in libxcwalk.PAGE_RECORDS)
    records[last + 1:last + 1] = deltas
    return img


@dataclass
class Seeds:
    """The seed images by kind, parsed once per module."""
    images: dict[str, Image]


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
    end = zstdframe.frame_header_size(frame)                               # the FCS ends the frame header
    return frame[:end - 4] + struct.pack("<I", size) + frame[end:]


def frame_of(data: bytes, **kw) -> bytes:
    """A frame as the sender writes one (content size and checksum) unless `kw` says otherwise."""
    return zstandard.ZstdCompressor(level=1, **{"write_checksum": True, **kw}).compress(data)


def slow_frame(length: int, expected: int) -> bytes:
    """A valid frame of `expected` random bytes, padded with empty raw blocks to `length` bytes: as long
    as a record may be, and slow to inflate (40 ms), so that a restorer's queue fills with such records."""
    def block(last: int, size: int) -> bytes:
        return (last | zstdframe.BLOCK_RAW << 1 | size << 3).to_bytes(zstdframe.BLOCK_HEADER_SIZE, "little")
    step = zstdframe.MAX_BLOCK_SIZE
    rng = random.Random(1)
    content = rng.randbytes(expected)
    # 4-byte size, content checksum, 128 KiB window
    head = struct.pack("<IBBI", zstdframe.FRAME_MAGIC, 0x84, (17 - 10) << 3, expected)
    data = b"".join(block(0, step) + content[at:at + step] for at in range(0, expected, step))
    checksum = zstandard.ZstdCompressor(write_checksum=True).compress(content)[-zstdframe.CHECKSUM_SIZE:]  # XXH64
    last = block(1, 0)
    empty = (length - len(head) - len(data) - len(last) - len(checksum)) // zstdframe.BLOCK_HEADER_SIZE
    frame = head + block(0, 0) * empty + data + last + checksum
    assert len(frame) <= length
    return frame


# The compressed record's fields, read leniently: a mutated body still answers -------------
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
    data = sum(1 for e in entries if e >> libxc.PFN_TYPE_SHIFT not in libxc.PFINFO_NO_DATA)
    return max(0, PAGE_SIZE * (data - zero_count))


def meta_length(count: int) -> int:
    """Where a compressed record's frame starts: its header, `count` pfn entries, the bitmap."""
    return compressed.HEADER_SIZE + 8 * count + compressed.bitmap_size(count)


def set_payload(r: Rec, payload: bytes, consistent: bool) -> None:
    """Replace a compressed record's frame; `consistent` keeps payload_length and the body in step."""
    body = r.body[:meta_length(struct.unpack_from("<I", r.body)[0])] + payload
    if consistent and len(body) >= 16:
        body = body[:12] + struct.pack("<I", len(payload)) + body[16:]
    r.body = body
