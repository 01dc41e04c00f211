"""xenopsd's suspend-image framing: the signature and (type, length) headers.

The image is the signature on the main fd, then headers of two
little-endian int64, each followed by its payload or by another writer's
stream (Libxc: xenguest's libxc stream; Demu: the vGPU stream, on its own fd).
"""
from __future__ import annotations

import struct

SIGNATURE = b"XenSavedDomv2-\n"
HEADER_FORMAT = "<qq"
HEADER_SIZE = struct.calcsize(HEADER_FORMAT)       # 16

XENOPS = 0x000F          # VM metadata record follows (length bytes)
LIBXC = 0x00F0           # the libxc stream follows (length 0)
LIBXL = 0x00F1
QEMU_TRAD = 0x0F00       # device-model state (length bytes)
QEMU_XEN = 0x0F01
DEMU = 0x0F10            # vGPU stream follows, on the vGPU fd
VARSTORED = 0x0F11
SWTPM = 0x0F13
END_OF_IMAGE = 0xFFFF

NAMES = {XENOPS: "Xenops", LIBXC: "Libxc", LIBXL: "Libxl", QEMU_TRAD: "Qemu_trad", QEMU_XEN: "Qemu_xen",
         DEMU: "Demu", VARSTORED: "Varstored", SWTPM: "Swtpm", END_OF_IMAGE: "End_of_image"}

# What a receiver accepts before reading a payload into memory.
MAX_XENOPS_RECORD = 1 << 20
MAX_QEMU_RECORD = 1 << 20        # the real xenopsd's cap on the device-model record
REJECTED = {LIBXL, QEMU_XEN}


class ImageError(Exception):
    """The suspend image breaks the framing."""


def name(htype: int) -> str:
    return NAMES.get(htype, f"unknown 0x{htype:x}")


def build_header(htype: int, length: int = 0) -> bytes:
    return struct.pack(HEADER_FORMAT, htype, length)


def parse_header(raw: bytes) -> tuple[int, int]:
    htype, length = struct.unpack(HEADER_FORMAT, raw)
    if htype not in NAMES:
        raise ImageError(f"unknown suspend image header type 0x{htype:x}")
    if htype in REJECTED:
        raise ImageError(f"{name(htype)} records are not supported")
    if length < 0:
        raise ImageError(f"{name(htype)} header with negative length {length}")
    limit = {XENOPS: MAX_XENOPS_RECORD, QEMU_TRAD: MAX_QEMU_RECORD}.get(htype, 0)
    if length > limit:
        raise ImageError(f"{name(htype)} record of {length} bytes exceeds the limit of {limit}")
    return htype, length


def check_signature(raw: bytes) -> None:
    if raw != SIGNATURE:
        raise ImageError(f"not a suspend image (signature {raw[:15]!r})")
