"""The one walk of a suspend image's main fd: its header rules applied in one place.

Every reader of an image (xenopsd-shim's ImageReader, xenguest's inspect) walks
it here. The rules per header type are image.HEADER_TYPES (what follows the
header, its length limit, what a reader does with it) plus, for a restore,
PLACES: where in the image the header may come. The walk:

    signature                       check_signature (the legacy one is refused)
    per header  type and length     image.parse_header: a known type, a length within its limit
                place (restore)     Place below, checked before the payload is read
                payload             RECORD: read here (bounded above); STREAM: the consumer reads
                                    (or hands over) the stream before it asks for the next header
                Xenops record       image.parse_xenops_record
                REFUSE              shown to the consumer, then refused (nothing after it has a length)
    End_of_image (restore)          only after a libxc stream (Libxc or Libxc_legacy)

`restore=False` (inspect) checks the framing only: an image the real reader refuses
for where its headers come is still well framed, and inspect shows it whole.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Callable, Iterator

from . import image, libxcwalk
from .fdio import Reader, Truncated


class Place(Enum):
    """Where a header may come in an image being restored (xenopsd's restore_common)."""
    VM = "vm"                    # first, and once: the record the domain is built from
    AFTER_VM = "after vm"        # after the Xenops record (it needs the domain)
    OTHER_FD = "other fd"        # never on the main fd (Demu: the vGPU stream has its own)
    AFTER_LIBXC = "after libxc"  # End_of_image: a restore needs a libxc stream before it
    ANYWHERE = "anywhere"        # refused wherever it comes


PLACES: dict[image.Action, Place] = {
    image.Action.VM: Place.VM, image.Action.XENGUEST: Place.AFTER_VM, image.Action.VGPU: Place.OTHER_FD,
    image.Action.DEVICE_MODEL: Place.AFTER_VM, image.Action.SKIP: Place.AFTER_VM,
    image.Action.END: Place.AFTER_LIBXC, image.Action.REFUSE: Place.ANYWHERE}


@dataclass
class Header:
    """One header that passed its rules, with its payload (RECORD types) read and checked."""
    offset: int
    htype: int
    length: int
    raw: bytes                               # the header's 16 bytes
    payload: bytes = b""
    xenops: image.XenopsRecord | None = None

    @property
    def action(self) -> image.Action:
        return image.HEADER_TYPES[self.htype].action


def _nothing(htype: int, length: int) -> None:
    pass


def walk(r: Reader, *, restore: bool,
         on_header: Callable[[int, int], None] = _nothing) -> Iterator[Header]:
    """The image's headers through End_of_image, each yielded once its rules pass.

    `restore`: the restore reader's rules as well (see Place; its errors say no offset,
    inspect's Xenops errors do). `on_header(htype, length)` sees each header as soon as its
    type and length are valid (the image reader logs it)."""
    read_signature(r)
    yield from headers(r, restore=restore, on_header=on_header)


def read_signature(r: Reader) -> bytes:
    raw = r.read(len(image.SIGNATURE), "signature")
    image.check_signature(raw)
    return raw


def headers(r: Reader, *, restore: bool, on_header: Callable[[int, int], None] = _nothing) -> Iterator[Header]:
    """The walk after the signature (inspect shows the signature before the first header)."""
    vm = restored = False
    while True:
        at = r.offset
        raw = r.read(image.HEADER_SIZE, "image header")
        htype, length = image.parse_header(raw)        # bounds every payload it lets through
        on_header(htype, length)
        h = image.HEADER_TYPES[htype]
        if restore:
            _check_place(htype, PLACES[h.action], vm, restored)
        header = Header(at, htype, length, raw)
        if h.payload == image.Payload.RECORD and h.action != image.Action.REFUSE:
            header.payload = r.read(length, f"{h.name} record")
        if htype == image.XENOPS:
            try:
                header.xenops = image.parse_xenops_record(header.payload)
            except image.ImageError as e:
                raise (e if restore else image.ImageError(f"at offset {at}: {e}")) from None
            vm = True
        yield header
        if h.action == image.Action.REFUSE:        # what follows has no length this reader knows
            raise image.refusal(htype)
        if h.action == image.Action.XENGUEST:
            restored = True
        elif h.action == image.Action.END:
            return


def _check_place(htype: int, place: Place, vm: bool, restored: bool) -> None:
    if place == Place.VM and vm:
        raise image.ImageError("second Xenops record")
    if place in (Place.AFTER_VM, Place.OTHER_FD) and not vm:
        raise image.ImageError(f"{image.name(htype)} before the Xenops record")
    if place == Place.OTHER_FD:
        raise image.ImageError("a Demu header on the main stream: the vGPU stream travels on its own fd")
    if place == Place.AFTER_LIBXC and not restored:
        raise image.ImageError("well formed, but useless stream: End_of_image before any Libxc stream")


def parse(raw: bytes | memoryview, *, restore: bool = False) -> list[Header | libxcwalk.Parsed]:
    """A whole image in memory: its headers in order, each libxc stream (parsed with every rule)
    right after its header. ImageError for the framing, libxc.StreamError inside a libxc stream;
    truncation is an ImageError. Bytes after End_of_image are left to the caller (see the last
    header's offset + HEADER_SIZE)."""
    r = libxcwalk.SourceReader.of_bytes(raw)
    parts: list[Header | libxcwalk.Parsed] = []
    try:
        for h in walk(r, restore=restore):
            parts.append(h)
            if h.action == image.Action.XENGUEST:
                parts.append(libxcwalk.read_stream(r))
    except Truncated as e:
        raise image.ImageError(str(e)) from None
    return parts
