"""Where a zstd frame ends, read from its headers (RFC 8878), without decompressing.

The zstd CLI reads its input ahead in large chunks and finishes a frame only
at end of input; on a socket that stays open for the handshake it would wait
for ever. The receiver therefore feeds zstd from the socket itself, block by
block, and closes zstd's input exactly where the sender's frame ends.
"""
from __future__ import annotations

import os
import socket
import struct

FRAME_MAGIC = 0xFD2FB528
SKIPPABLE_MAGIC_MASK = 0xFFFFFFF0
SKIPPABLE_MAGIC = 0x184D2A50
BLOCK_HEADER_SIZE = 3
BLOCK_RAW, BLOCK_RLE, BLOCK_COMPRESSED, BLOCK_RESERVED = 0, 1, 2, 3
CHECKSUM_SIZE = 4
MAX_BLOCK_SIZE = 128 << 10
_DICT_ID_SIZES = (0, 1, 2, 4)
_FCS_SIZES = (0, 2, 4, 8)


class FrameError(Exception):
    pass


def frame_header_size(first: bytes) -> int:
    """Size of magic + frame header, from the first 5 bytes (magic and descriptor)."""
    magic, fhd = struct.unpack_from("<IB", first)
    if magic != FRAME_MAGIC:
        raise FrameError(f"not a zstd frame (magic 0x{magic:08x})")
    if fhd & 0x08:
        raise FrameError("zstd frame header reserved bit set")
    single_segment = bool(fhd & 0x20)
    fcs_flag = fhd >> 6
    fcs = 1 if (fcs_flag == 0 and single_segment) else _FCS_SIZES[fcs_flag]
    return 4 + 1 + (0 if single_segment else 1) + _DICT_ID_SIZES[fhd & 0x03] + fcs


def has_checksum(first: bytes) -> bool:
    return bool(first[4] & 0x04)


def block(header: bytes) -> tuple[bool, int]:
    """(last block?, bytes that follow the 3-byte block header)."""
    value = int.from_bytes(header[:3], "little")
    last, btype, size = bool(value & 1), (value >> 1) & 3, value >> 3
    if btype == BLOCK_RESERVED:
        raise FrameError("zstd block of reserved type")
    if size > MAX_BLOCK_SIZE:
        raise FrameError(f"zstd block of {size} bytes exceeds {MAX_BLOCK_SIZE}")
    return last, 1 if btype == BLOCK_RLE else size


def _peek(sock: socket.socket, n: int) -> bytes:
    data = sock.recv(n, socket.MSG_PEEK | socket.MSG_WAITALL)
    if len(data) < n:
        raise FrameError("connection closed inside a zstd frame")
    return data


def _move(sock: socket.socket, pipe_w: int, n: int) -> None:
    """Move exactly n bytes from the socket into the pipe, in the kernel (splice)."""
    while n:
        moved = os.splice(sock.fileno(), pipe_w, n)
        if moved == 0:
            raise FrameError("connection closed inside a zstd frame")
        n -= moved


def relay_one_frame(sock: socket.socket, pipe_w: int) -> int:
    """Feed exactly one zstd frame from the socket into zstd's stdin; returns its size."""
    first = _peek(sock, 5)
    header = frame_header_size(first)
    total = header
    _move(sock, pipe_w, header)
    while True:
        last, size = block(_peek(sock, BLOCK_HEADER_SIZE))
        _move(sock, pipe_w, BLOCK_HEADER_SIZE + size)
        total += BLOCK_HEADER_SIZE + size
        if last:
            break
    if has_checksum(first):
        _move(sock, pipe_w, CHECKSUM_SIZE)
        total += CHECKSUM_SIZE
    return total
