"""The one walk of a libxc stream: the record-rules table and the walker that applies it.

As Xen's verify-stream-v2 dispatches records through one table, every reader
of a libxc stream (the restorer, inspect, convert) walks it here and sees
only records that passed every rule; what it does with them is its own.

RULES, one row per record type a receiver knows (`RecordRule`):
    spec          the spec's name (used in the restorer's error texts)
    body          ANY, or EMPTY: a body is an error (END, STATIC_DATA_END)
    after_static  must come after STATIC_DATA_END (page records; v2 streams have no STATIC_DATA_END)
    required      must have come before END (the context the domain cannot run without)
    check         validates the body; its result (the blob) is what the restorer keeps
    context       the domain context blob the record fills
    refused       valid in the format, refused on a migration (VERIFY, CHECKPOINT)
A type without a row is an error unless its optional bit (REC_TYPE_OPTIONAL) is set:
an optional record is skipped. Page records' bodies are checked by the consumer
against its domain (the restorer inflates them on a pool).

Order of the checks per record (it decides which error a corrupt stream gets):
header length bound (before any allocation), the body and its padding read
whole, non-zero padding, no row (unknown mandatory), then the row's body,
after_static, check and refused; required when END comes.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import Enum
from typing import Callable, Iterator

from .compressed import REC_TYPE as REC_TYPE_COMPRESSED_PAGE_DATA
from .delta import REC_TYPE as REC_TYPE_DELTA_PAGE_DATA
from .fdio import Reader, Truncated
from . import libxc


class Body(Enum):
    ANY = "any"
    EMPTY = "empty"


@dataclass(frozen=True)
class RecordRule:
    rtype: int
    spec: str
    body: Body = Body.ANY
    after_static: bool = False
    required: bool = False
    check: Callable[[memoryview], bytes] | None = None
    context: str | None = None
    refused: bool = False


def _hvm_context(body: memoryview) -> bytes:
    if not len(body):
        raise libxc.StreamError("empty HVM_CONTEXT record")
    return bytes(body)


RULES: dict[int, RecordRule] = {rule.rtype: rule for rule in (
    RecordRule(libxc.REC_TYPE_END, "END", Body.EMPTY),
    RecordRule(libxc.REC_TYPE_STATIC_DATA_END, "STATIC_DATA_END", Body.EMPTY),
    RecordRule(libxc.REC_TYPE_PAGE_DATA, "PAGE_DATA", after_static=True),
    RecordRule(REC_TYPE_COMPRESSED_PAGE_DATA, "COMPRESSED_PAGE_DATA", after_static=True),
    RecordRule(REC_TYPE_DELTA_PAGE_DATA, "DELTA_PAGE_DATA", after_static=True),
    RecordRule(libxc.REC_TYPE_X86_CPUID_POLICY, "X86_CPUID_POLICY", context="cpuid_policy",
               check=lambda b: libxc.check_array("X86_CPUID_POLICY", bytes(b), libxc.X86_CPUID_POLICY_ENTRY_SIZE)),
    RecordRule(libxc.REC_TYPE_X86_MSR_POLICY, "X86_MSR_POLICY", context="msr_policy",
               check=lambda b: libxc.check_array("X86_MSR_POLICY", bytes(b), libxc.X86_MSR_POLICY_ENTRY_SIZE)),
    RecordRule(libxc.REC_TYPE_X86_TSC_INFO, "X86_TSC_INFO", required=True, context="tsc_info",
               check=lambda b: libxc.check_tsc_info(bytes(b))),
    RecordRule(libxc.REC_TYPE_HVM_CONTEXT, "HVM_CONTEXT", required=True, context="hvm_context", check=_hvm_context),
    RecordRule(libxc.REC_TYPE_HVM_PARAMS, "HVM_PARAMS", required=True, context="hvm_params",
               check=lambda b: libxc.parse_hvm_params(bytes(b))),
    RecordRule(libxc.REC_TYPE_VERIFY, "VERIFY", refused=True),
    RecordRule(libxc.REC_TYPE_CHECKPOINT, "CHECKPOINT", refused=True),
)}
REQUIRED = frozenset(t for t, rule in RULES.items() if rule.required)
PAGE_RECORDS = frozenset(t for t, rule in RULES.items() if rule.after_static)
CONTEXT = {t: rule.context for t, rule in RULES.items() if rule.context}


@dataclass
class Headers:
    """The libxc image and domain headers."""
    offset: int
    raw: bytes
    version: int
    domain: tuple[int, int, int, int, int]      # type, page_shift, reserved, xen_major, xen_minor


@dataclass
class Record:
    """One record that passed its rules; `raw` (header, body, padding) and `body` view the walk's
    buffer and are valid until the walk moves on (no copy: the restorer decodes pages from it)."""
    offset: int
    rtype: int
    length: int
    raw: memoryview
    body: memoryview
    blob: bytes | None = None       # the checked body of a context record


def _nothing() -> None:
    pass


def walk(r: Reader, *, locate: bool = False, finish: Callable[[], None] = _nothing,
         buffer: Callable[[int], memoryview] | None = None) -> Iterator[Headers | Record]:
    """The headers, then every record through END, each yielded once its rules pass.

    `locate`: errors name records as inspect prints them and say where (the restorer's name the
    spec's constants). `finish` runs at a valid END before the required-record check: a consumer
    that applies records asynchronously completes them there, so their errors come first.
    `buffer(n)`, if given, supplies the n bytes the next record is read into (a consumer that keeps
    a record past the next one gives each its own); by default one buffer serves every record."""
    at = r.offset
    ihdr = r.read(libxc.IHDR_SIZE, "image header")
    version = libxc.parse_image_header(ihdr)
    dhdr = r.read(libxc.DHDR_SIZE, "domain header")
    libxc.parse_domain_header(dhdr)
    yield Headers(at, ihdr + dhdr, version, struct.unpack(libxc.DHDR_FORMAT, dhdr))
    buf = bytearray(libxc.RH_SIZE + libxc.MAX_RECORD_BODY + 8) if buffer is None else b""
    seen: set[int] = set()
    static_done = version < 3
    while True:
        at = r.offset
        head = r.read(libxc.RH_SIZE, "record header")
        rtype, length = libxc.parse_record_header(head)        # bounds the length before the buffer is used
        name = libxc.record_name(rtype)
        where = f" at offset {at}" if locate else ""
        size = libxc.RH_SIZE + length + libxc.padding(length)
        raw = buffer(size)[:size] if buffer is not None else memoryview(buf)[:size]
        raw[:libxc.RH_SIZE] = head
        r.readinto(raw[libxc.RH_SIZE:], f"{name} record")
        if any(raw[libxc.RH_SIZE + length:]):
            raise libxc.StreamError(f"non-zero padding after {name} record at offset {at}")
        record = Record(at, rtype, length, raw, raw[libxc.RH_SIZE:libxc.RH_SIZE + length])
        rule = RULES.get(rtype)
        if rule is None:
            if not rtype & libxc.REC_TYPE_OPTIONAL:
                raise libxc.StreamError(f"unknown mandatory record type 0x{rtype:08x} at offset {at}")
        elif rule.body == Body.EMPTY and length:
            raise libxc.StreamError(f"{name if locate else rule.spec} record with a body{where}")
        elif rule.after_static and not static_done:
            raise libxc.StreamError(f"{name} before STATIC_DATA_END{where}")
        elif rule.check is not None:
            record.blob = rule.check(record.body)
        elif rule.refused:
            raise libxc.StreamError(f"{name} record is not supported on a migration")
        static_done = static_done or rtype == libxc.REC_TYPE_STATIC_DATA_END
        seen.add(rtype)
        if rtype == libxc.REC_TYPE_END:
            finish()
            if REQUIRED - seen:
                raise libxc.StreamError("stream ended without "
                                        + ", ".join(sorted(libxc.record_name(t) for t in REQUIRED - seen)))
        yield record
        if rtype == libxc.REC_TYPE_END:
            return


# Bytes-level reading (tests' models, and any reader of a stream already in memory) -----------
# readinto-style source: fills the front of the view, returns the count (0 at the end).
Source = Callable[[memoryview], int]


class SourceReader(Reader):
    """fdio.Reader's exact reads and offsets over any source (fdio.Reader reads an fd only)."""

    def __init__(self, source: Source, offset: int = 0) -> None:
        super().__init__(-1)
        self.source = source
        self.offset = offset

    @classmethod
    def of_bytes(cls, raw: bytes | memoryview, offset: int = 0) -> SourceReader:
        """A reader of `raw` from `offset` (offsets in errors count from raw's start)."""
        rest = memoryview(raw)[offset:]

        def source(view: memoryview) -> int:
            nonlocal rest
            n = min(len(view), len(rest))
            view[:n] = rest[:n]
            rest = rest[n:]
            return n
        return cls(source, offset)

    def readinto(self, view: memoryview, what: str) -> None:
        got, size = 0, len(view)
        while got < size:
            n = self.source(view[got:])
            if not n:
                raise Truncated(f"stream truncated in {what} at offset {self.offset + got}: {got} of {size} bytes")
            got += n
        self.offset += size

    def at_end(self) -> bool:
        return self.source(memoryview(bytearray(1))) == 0


@dataclass
class Parsed:
    """A whole stream read from bytes: its headers, its records (bodies copied out), where it ends."""
    headers: Headers
    records: list[tuple[int, int, bytes]]          # (offset, type, body)
    end: int


def read_stream(r: Reader) -> Parsed:
    """Walk the libxc stream `r` is at with every rule, holding its records (bodies copied out)."""
    parts = walk(r)
    headers = next(parts)
    assert isinstance(headers, Headers)
    records = [(p.offset, p.rtype, bytes(p.body)) for p in parts if isinstance(p, Record)]
    return Parsed(headers, records, r.offset)


def parse(raw: bytes | memoryview, offset: int = 0) -> Parsed:
    """The libxc stream at raw[offset:]; StreamError on the first broken rule (truncation included)."""
    try:
        return read_stream(SourceReader.of_bytes(raw, offset))
    except Truncated as e:
        raise libxc.StreamError(str(e)) from None
