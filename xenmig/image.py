"""xenopsd's suspend-image framing: the signature, the (type, length) headers and the Xenops record.

The image is the signature on the main fd, then headers of two
little-endian int64, each followed by its payload or by another writer's
stream (Libxc: xenguest's libxc stream; Demu: the vGPU stream, on its own fd).
Every stream fd ends with End_of_image. The real framing is
xen-api ocaml/xenopsd/lib/suspend_image.ml; docs/suspend-image.md tells
what this project reads, skips and refuses, and why.
"""
from __future__ import annotations

import re
import struct
import time
from dataclasses import dataclass
from enum import Enum

from . import sexp

SIGNATURE = b"XenSavedDomv2-\n"
LEGACY_SIGNATURE = b"XenSavedDomain\n"       # pre-Xen-4.5 images; the real xenopsd converts them
HEADER_FORMAT = "<qq"
HEADER_SIZE = struct.calcsize(HEADER_FORMAT)       # 16

XENOPS = 0x000F          # VM metadata record follows (length bytes)
LIBXC = 0x00F0           # the libxc stream follows (length 0)
LIBXL = 0x00F1
LIBXC_LEGACY = 0x00F2    # a libxc stream as well, for the real reader (restore:xenguest)
QEMU_TRAD = 0x0F00       # device-model state (length bytes)
QEMU_XEN = 0x0F01
DEMU = 0x0F10            # vGPU stream follows, on the vGPU fd
VARSTORED = 0x0F11       # UEFI variables (length bytes)
SWTPM0 = 0x0F12          # vTPM state, the first format (length bytes)
SWTPM = 0x0F13           # vTPM state (length bytes)
END_OF_IMAGE = 0xFFFF


class Payload(Enum):
    NONE = "none"            # nothing follows the header (End_of_image)
    RECORD = "record"        # `length` bytes follow
    STREAM = "stream"        # an emulator's stream follows; its length field is 0


class Action(Enum):
    """What a reader does with a header, as the real restore_common (xc/domain.ml) does."""
    VM = "vm"                # Xenops: the VM's record
    XENGUEST = "xenguest"    # restore:xenguest
    VGPU = "vgpu"            # restore:vgpu
    DEVICE_MODEL = "qemu"    # kept for the device model
    SKIP = "skip"            # read and set aside: no varstored or swtpm is emulated here
    END = "end"
    REFUSE = "refuse"        # the real reader fails the restore (Suspend_image_failure)


@dataclass(frozen=True)
class HeaderType:
    code: int
    name: str
    payload: Payload
    action: Action
    limit: int               # the largest length a reader accepts


MAX_XENOPS_RECORD = 1 << 20
MAX_QEMU_RECORD = 1 << 20        # the real xenopsd's cap on the device-model record (consume_qemu_record)
MAX_SKIPPED_RECORD = 1 << 20     # this project's bound: the real one reads varstored/swtpm whole into memory

HEADER_TYPES = {h.code: h for h in (
    HeaderType(XENOPS, "Xenops", Payload.RECORD, Action.VM, MAX_XENOPS_RECORD),
    HeaderType(LIBXC, "Libxc", Payload.STREAM, Action.XENGUEST, 0),
    HeaderType(LIBXL, "Libxl", Payload.STREAM, Action.REFUSE, 0),
    HeaderType(LIBXC_LEGACY, "Libxc_legacy", Payload.STREAM, Action.XENGUEST, 0),
    HeaderType(QEMU_TRAD, "Qemu_trad", Payload.RECORD, Action.DEVICE_MODEL, MAX_QEMU_RECORD),
    HeaderType(QEMU_XEN, "Qemu_xen", Payload.RECORD, Action.REFUSE, 0),
    HeaderType(DEMU, "Demu", Payload.STREAM, Action.VGPU, 0),
    HeaderType(VARSTORED, "Varstored", Payload.RECORD, Action.SKIP, MAX_SKIPPED_RECORD),
    HeaderType(SWTPM0, "Swtpm0", Payload.RECORD, Action.SKIP, MAX_SKIPPED_RECORD),
    HeaderType(SWTPM, "Swtpm", Payload.RECORD, Action.SKIP, MAX_SKIPPED_RECORD),
    HeaderType(END_OF_IMAGE, "End_of_image", Payload.NONE, Action.END, 0),
)}
NAMES = {code: h.name for code, h in HEADER_TYPES.items()}


class ImageError(Exception):
    """The suspend image breaks the framing."""


def name(htype: int) -> str:
    return NAMES.get(htype, f"unknown 0x{htype:x}")


def build_header(htype: int, length: int = 0) -> bytes:
    return struct.pack(HEADER_FORMAT, htype, length)


def parse_header(raw: bytes) -> tuple[int, int]:
    """A known type with a length its reader accepts; refused types pass (their reader refuses them)."""
    htype, length = struct.unpack(HEADER_FORMAT, raw)
    h = HEADER_TYPES.get(htype)
    if h is None:
        raise ImageError(f"unknown suspend image header type 0x{htype:x}")
    if length < 0:
        raise ImageError(f"{h.name} header with negative length {length}")
    if length > h.limit and h.action != Action.REFUSE:
        raise ImageError(f"{h.name} record of {length} bytes exceeds the limit of {h.limit}")
    return htype, length


def refusal(htype: int) -> ImageError:
    return ImageError(f"{name(htype)} records are not supported (the real xenopsd fails the restore on them too)")


def check_signature(raw: bytes) -> None:
    if raw == LEGACY_SIGNATURE:
        raise ImageError("a legacy (pre-Xen-4.5) suspend image: the real xenopsd converts those with its "
                         "legacy conversion tool, this project does not")
    if raw != SIGNATURE:
        raise ImageError(f"not a suspend image (signature {raw[:15]!r})")


# The Xenops record ------------------------------------------------------------
# suspend_image.ml Xenops_record.t, printed by ppx_sexp_conv's sexp_of_t: the
# fields in declaration order, an absent [@sexp.option] field left out.
RECORD_FIELDS = ("time", "word_size", "vm_str", "xs_subtree")
REQUIRED_FIELDS = ("time", "word_size")
WORD_SIZE = 64                   # Sys.word_size on the real (64-bit) dom0
_INT = re.compile(r"-?[0-9]+$")


@dataclass
class XenopsRecord:
    time: str
    word_size: int
    vm_str: str | None = None
    xs_subtree: list[tuple[str, str]] | None = None


def now() -> str:
    """Xapi_stdext_date.Date.to_string (now ()): basic date, extended time, UTC."""
    return time.strftime("%Y%m%dT%H:%M:%SZ", time.gmtime())


def build_xenops_record(rec: XenopsRecord) -> bytes:
    fields: list[sexp.Sexp] = [["time", rec.time], ["word_size", str(rec.word_size)]]
    if rec.vm_str is not None:
        fields.append(["vm_str", rec.vm_str])
    if rec.xs_subtree is not None:
        fields.append(["xs_subtree", [[k, v] for k, v in rec.xs_subtree]])
    return sexp.dumps(fields)


def parse_xenops_record(raw: bytes) -> XenopsRecord:
    """Xenops_record.of_string's rules: a list of (field value) pairs, each known field once, the required present."""
    try:
        tree = sexp.loads(raw, "Xenops record")
    except sexp.SexpError as e:
        raise ImageError(str(e)) from None
    if not isinstance(tree, list):
        raise ImageError("Xenops record is an atom, not a record")
    seen: dict[str, sexp.Sexp] = {}
    for f in tree:
        if not (isinstance(f, list) and len(f) == 2 and isinstance(f[0], str)):
            raise ImageError("Xenops record has a field that is not a (name value) pair")
        if f[0] not in RECORD_FIELDS:
            raise ImageError(f"Xenops record has an unknown field {f[0]!r}")
        if f[0] in seen:
            raise ImageError(f"Xenops record has field {f[0]} twice")
        seen[f[0]] = f[1]
    missing = [f for f in REQUIRED_FIELDS if f not in seen]
    if missing:
        raise ImageError(f"Xenops record has no {' or '.join(missing)}")
    t, ws, vm_str, subtree = (seen.get(f) for f in RECORD_FIELDS)
    if not isinstance(t, str):
        raise ImageError("Xenops record's time is not an atom")
    if not (isinstance(ws, str) and _INT.match(ws)):
        raise ImageError("Xenops record's word_size is not an integer")
    if vm_str is not None and not isinstance(vm_str, str):
        raise ImageError("Xenops record's vm_str is not an atom")
    pairs = None
    if subtree is not None:
        if not isinstance(subtree, list) or not all(
                isinstance(p, list) and len(p) == 2 and all(isinstance(x, str) for x in p) for p in subtree):
            raise ImageError("Xenops record's xs_subtree is not a list of (key value) pairs")
        pairs = [(p[0], p[1]) for p in subtree]         # type: ignore[index]
    return XenopsRecord(t, int(ws), vm_str, pairs)
