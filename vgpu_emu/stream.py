"""The vGPU migration stream: a header, then chunks of GPU memory, then an end chunk.

This project's own format (the real demu's is not public). Little-endian.
    header: magic "XSVGPU01", version u32 (1), reserved u32 (0), size u64 (bytes of vGPU memory)
    chunk:  offset u64, length u32, kind u32 (0 data: `length` bytes follow; 1 end: length 0)
"""
from __future__ import annotations

import struct

HEADER_FORMAT = "<8sIIQ"
HEADER_SIZE = struct.calcsize(HEADER_FORMAT)     # 24
MAGIC = b"XSVGPU01"
VERSION = 1
CHUNK_FORMAT = "<QII"
CHUNK_SIZE = struct.calcsize(CHUNK_FORMAT)       # 16
KIND_DATA, KIND_END = 0, 1
MAX_CHUNK = 1 << 20


class VgpuStreamError(Exception):
    pass


def build_header(size: int) -> bytes:
    return struct.pack(HEADER_FORMAT, MAGIC, VERSION, 0, size)


def parse_header(raw: bytes, expected_size: int) -> int:
    magic, version, reserved, size = struct.unpack(HEADER_FORMAT, raw)
    if magic != MAGIC:
        raise VgpuStreamError(f"not a vGPU stream (magic {magic!r})")
    if version != VERSION or reserved:
        raise VgpuStreamError(f"unsupported vGPU stream version {version}")
    if size != expected_size:
        raise VgpuStreamError(f"vGPU stream of {size} bytes for a vGPU of {expected_size}")
    return size


def build_chunk(offset: int, length: int, kind: int = KIND_DATA) -> bytes:
    return struct.pack(CHUNK_FORMAT, offset, length, kind)


def parse_chunk(raw: bytes, size: int) -> tuple[int, int, int]:
    offset, length, kind = struct.unpack(CHUNK_FORMAT, raw)
    if kind == KIND_END:
        if length:
            raise VgpuStreamError("vGPU end chunk with a length")
        return offset, 0, kind
    if kind != KIND_DATA:
        raise VgpuStreamError(f"unknown vGPU chunk kind {kind}")
    if not 0 < length <= MAX_CHUNK or offset + length > size:
        raise VgpuStreamError(f"vGPU chunk [{offset}, +{length}) outside the vGPU's {size} bytes")
    return offset, length, kind
