"""Self-test of tests/streamcheck.py against hand-built libxc streams and suspend images.

The streams are assembled here with ``struct`` only, never with project code,
so these tests pin the checker to the specification rather than to the writer
it is meant to police.
"""

from __future__ import annotations

import struct
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest

from streamcheck import StreamCheckError, check_file, check_image, check_stream

PAGE = 4096
XTAB, XALLOC, BROKEN, L1PIN = 0xF, 0xE, 0xD, 0x9


def ihdr(version: int = 3, options: int = 0, marker: int = 2**64 - 1,
         ident: int = 0x58454E46, res1: int = 0, res2: int = 0) -> bytes:
    """Image header, big-endian as the spec demands."""
    return struct.pack("!QIIHHI", marker, ident, version, options, res1, res2)


def dhdr(dtype: int = 2, page_shift: int = 12, res: int = 0) -> bytes:
    """Domain header (Xen 4.17)."""
    return struct.pack("<IHHII", dtype, page_shift, res, 4, 17)


def rec(rtype: int, body: bytes = b"", *, pad: bool = True,
        pad_byte: int = 0, length: int | None = None) -> bytes:
    """Record header + body + padding to 8; knobs allow breaking each part."""
    n = len(body) if length is None else length
    padding = bytes([pad_byte]) * (-len(body) % 8) if pad else b""
    return struct.pack("<II", rtype, n) + body + padding


def pfn(num: int, ptype: int = 0) -> int:
    """PAGE_DATA pfn word: type in bits 63-60, pfn in 51-0."""
    return (ptype << 60) | num


def page_data(words: list[int], pages: int | None = None, count: int | None = None,
              res: int = 0) -> bytes:
    """PAGE_DATA body; ``pages`` defaults to one page per data-carrying pfn."""
    if pages is None:
        pages = sum(1 for w in words if (w >> 60) not in (XTAB, XALLOC, BROKEN))
    head = struct.pack("<II", len(words) if count is None else count, res)
    return head + struct.pack(f"<{len(words)}Q", *words) + b"\xab" * (PAGE * pages)


def tsc(res: int = 0) -> bytes:
    return struct.pack("<IIQII", 0, 2_000_000, 123456789, 1, res)


def hvm_params(entries: list[tuple[int, int]], count: int | None = None) -> bytes:
    head = struct.pack("<II", len(entries) if count is None else count, 0)
    return head + b"".join(struct.pack("<QQ", i, v) for i, v in entries)


END, PAGE_DATA, TSC, HVM_CONTEXT, HVM_PARAMS = 0, 1, 8, 9, 10
TOOLSTACK, CHECKPOINT, SDE, CPUID, MSR = 11, 14, 16, 17, 18

CPUID_BODY = b"\x01" * 48  # two xen_cpuid_leaf_t
MSR_BODY = b"\x02" * 16    # one xen_msr_entry_t


def records(**swap: bytes) -> list[bytes]:
    """The records of a typical v3 HVM stream; ``swap`` replaces one by key."""
    parts = {
        "cpuid": rec(CPUID, CPUID_BODY),
        "msr": rec(MSR, MSR_BODY),
        "sde": rec(SDE),
        "pages": rec(PAGE_DATA, page_data([pfn(0), pfn(1), pfn(7, XTAB)])),
        "tsc": rec(TSC, tsc()),
        "params": rec(HVM_PARAMS, hvm_params([(1, 2), (3, 4)])),
        "context": rec(HVM_CONTEXT, b"hvmctx-12byt"),
        "end": rec(END),
    }
    parts.update(swap)
    return list(parts.values())


def stream(head: bytes | None = None, dom: bytes | None = None,
           recs: list[bytes] | None = None) -> bytes:
    return ((ihdr() if head is None else head) + (dhdr() if dom is None else dom)
            + b"".join(records() if recs is None else recs))


VALID = stream()


def test_valid_v3_hvm_stream_summary() -> None:
    summary = check_stream(VALID)
    assert summary["version"] == 3
    assert summary["domain_type"] == 2
    assert summary["end_seen"] is True
    assert summary["pages"] == 2
    assert summary["page_records"] == 1
    assert summary["length"] == len(VALID)
    assert summary["records"] == [
        ("X86_CPUID_POLICY", 48), ("X86_MSR_POLICY", 16), ("STATIC_DATA_END", 0),
        ("PAGE_DATA", 8 + 3 * 8 + 2 * PAGE), ("X86_TSC_INFO", 24),
        ("HVM_PARAMS", 40), ("HVM_CONTEXT", 12), ("END", 0)]


def test_valid_variants() -> None:
    check_stream(memoryview(VALID))
    check_stream(bytearray(VALID))
    # Types without data, pinned tables with data, several PAGE_DATA records.
    words = [pfn(2, XALLOC), pfn(3, BROKEN), pfn(4, L1PIN), pfn(5)]
    many = [pfn(i) for i in range(1024)]
    s = stream(recs=records(pages=rec(PAGE_DATA, page_data(words))
                            + rec(PAGE_DATA, page_data(many))))
    summary = check_stream(s)
    assert (summary["pages"], summary["page_records"]) == (2 + 1024, 2)
    # v2 stream: no STATIC_DATA_END, no CPU policy records.
    v2 = stream(ihdr(version=2), recs=records(cpuid=b"", msr=b"", sde=b""))
    assert check_stream(v2)["version"] == 2
    # PV domain accepted only when HVM is not demanded.
    pv = stream(dom=dhdr(dtype=1), recs=records(params=b"", context=b""))
    assert check_stream(pv, hvm_expected=False)["domain_type"] == 1
    # Checkpoint lets a new HVM_PARAMS / HVM_CONTEXT pair follow.
    again = records()[-3:-1]
    s = stream(recs=records(end=rec(CHECKPOINT) + b"".join(again) + rec(END)))
    check_stream(s)


def test_optional_records_and_trailing_data_switches() -> None:
    s = stream(recs=records(tsc=rec(0x80000001, b"opt") + rec(TSC, tsc())))
    with pytest.raises(StreamCheckError, match="optional"):
        check_stream(s)
    assert ("OPTIONAL_0x80000001", 3) in check_stream(s, allow_optional=True)["records"]
    assert check_stream(VALID + b"x" * 8, allow_trailing=True)["length"] == len(VALID)


def test_check_file_offset_and_cli(tmp_path: Path) -> None:
    path = tmp_path / "stream.bin"
    path.write_bytes(b"\x00" * 16 + VALID)
    assert check_file(str(path), offset=16)["pages"] == 2
    script = str(Path(__file__).resolve().parent / "streamcheck.py")
    ok = subprocess.run([sys.executable, script, str(path), "--offset", "16"],
                        capture_output=True, text=True)
    assert ok.returncode == 0 and "2 pages" in ok.stdout
    bad = subprocess.run([sys.executable, script, str(path)],
                         capture_output=True, text=True)
    assert bad.returncode == 1 and "marker" in bad.stderr
    empty = tmp_path / "empty.bin"
    empty.write_bytes(b"")
    with pytest.raises(StreamCheckError, match="truncated image header"):
        check_file(str(empty))


def _cut(n: int) -> bytes:
    return VALID[:n]


PAGES_AT = len(ihdr() + dhdr()) + sum(len(r) for r in records()[:3])

CORRUPTIONS: list[tuple[str, Callable[[], bytes], list[str]]] = [
    ("wrong marker", lambda: stream(ihdr(marker=0xFFFFFFFF00000000)), ["marker"]),
    ("wrong id", lambda: stream(ihdr(ident=0x58454E47)), ["image id"]),
    ("version 1", lambda: stream(ihdr(version=1)), ["version 1"]),
    ("version 4", lambda: stream(ihdr(version=4)), ["version 4"]),
    ("reserved option bit", lambda: stream(ihdr(options=0x0002)), ["reserved", "options"]),
    ("big-endian option", lambda: stream(ihdr(options=0x0001)), ["big-endian"]),
    ("image reserved field", lambda: stream(ihdr(res2=1)), ["reserved image header"]),
    ("page_shift 13", lambda: stream(dom=dhdr(page_shift=13)), ["page_shift 13"]),
    ("domain reserved", lambda: stream(dom=dhdr(res=1)), ["reserved domain header"]),
    ("unknown domain type", lambda: stream(dom=dhdr(dtype=7)), ["domain type"]),
    ("PV when HVM expected", lambda: stream(dom=dhdr(dtype=1)), ["expected 2"]),
    ("unpadded record", lambda: stream(recs=records(
        context=rec(HVM_CONTEXT, b"hvmctx-12byt", pad=False),
        end=rec(HVM_PARAMS, hvm_params([])) + rec(END))), ["padding"]),
    ("non-zero padding", lambda: stream(recs=records(
        context=rec(HVM_CONTEXT, b"hvmctx-12byt", pad_byte=0x5A))), ["non-zero padding"]),
    ("PAGE_DATA count 0", lambda: stream(recs=records(
        pages=rec(PAGE_DATA, page_data([], count=0)))), ["count is 0"]),
    ("PAGE_DATA reserved", lambda: stream(recs=records(
        pages=rec(PAGE_DATA, page_data([pfn(0)], res=1)))), ["PAGE_DATA reserved"]),
    ("pfn reserved bits", lambda: stream(recs=records(
        pages=rec(PAGE_DATA, page_data([pfn(0), pfn(1) | (1 << 52)])))),
     ["pfn[1]", "reserved bits"]),
    ("pfn invalid type", lambda: stream(recs=records(
        pages=rec(PAGE_DATA, page_data([pfn(0, 0x6)], pages=0)))), ["invalid page type"]),
    ("PAGE_DATA extra page", lambda: stream(recs=records(
        pages=rec(PAGE_DATA, page_data([pfn(0), pfn(1, XTAB)], pages=2)))),
     ["PAGE_DATA body_length", "expected"]),
    ("PAGE_DATA missing page", lambda: stream(recs=records(
        pages=rec(PAGE_DATA, page_data([pfn(0), pfn(1)], pages=1)))),
     ["PAGE_DATA body_length", "expected"]),
    ("PAGE_DATA too short for pfns", lambda: stream(recs=records(
        pages=rec(PAGE_DATA, page_data([pfn(0)], count=3, pages=0)))), ["too short"]),
    ("1025 pfns", lambda: stream(recs=records(
        pages=rec(PAGE_DATA, page_data([pfn(i, XTAB) for i in range(1025)])))),
     ["1025", "1024"]),
    ("unknown mandatory 0x13", lambda: stream(recs=records(tsc=rec(0x13, b"12345678"))),
     ["unknown mandatory", "0x00000013"]),
    ("unknown mandatory 0x7fffffff", lambda: stream(recs=records(tsc=rec(0x7FFFFFFF))),
     ["unknown mandatory"]),
    ("truncated image header", lambda: _cut(10), ["truncated image header"]),
    ("truncated domain header", lambda: _cut(30), ["truncated domain header"]),
    ("truncated page data", lambda: _cut(PAGES_AT + 100), ["truncated PAGE_DATA"]),
    ("truncated END header", lambda: _cut(len(VALID) - 3), ["truncated record header"]),
    ("data after END", lambda: VALID + rec(TSC, tsc()), ["after END"]),
    ("missing END", lambda: _cut(len(VALID) - 8), ["missing END"]),
    ("END with body", lambda: stream(recs=records(end=rec(END, b"x"))), ["END body_length"]),
    ("TSC_INFO too short", lambda: stream(recs=records(tsc=rec(TSC, tsc()[:20]))),
     ["X86_TSC_INFO body_length 20", "24"]),
    ("TSC_INFO too long", lambda: stream(recs=records(tsc=rec(TSC, tsc() + bytes(8)))),
     ["X86_TSC_INFO body_length 32", "24"]),
    ("TSC_INFO reserved", lambda: stream(recs=records(tsc=rec(TSC, tsc(res=1)))),
     ["X86_TSC_INFO reserved"]),
    ("CPUID not multiple of 24", lambda: stream(recs=records(cpuid=rec(CPUID, bytes(30)))),
     ["X86_CPUID_POLICY", "multiple of 24"]),
    ("CPUID empty", lambda: stream(recs=records(cpuid=rec(CPUID))), ["multiple of 24"]),
    ("MSR not multiple of 16", lambda: stream(recs=records(msr=rec(MSR, bytes(24)))),
     ["X86_MSR_POLICY", "multiple of 16"]),
    ("HVM_PARAMS count mismatch", lambda: stream(recs=records(
        params=rec(HVM_PARAMS, hvm_params([(1, 2)], count=2)))), ["HVM_PARAMS body_length"]),
    ("HVM_PARAMS reserved", lambda: stream(recs=records(
        params=rec(HVM_PARAMS, struct.pack("<II", 0, 9)))), ["HVM_PARAMS reserved"]),
    ("empty HVM_CONTEXT", lambda: stream(recs=records(context=rec(HVM_CONTEXT))),
     ["HVM_CONTEXT body is empty"]),
    ("no HVM_CONTEXT", lambda: stream(recs=records(context=b"")), ["without any HVM_CONTEXT"]),
    ("params after context", lambda: stream(recs=records(
        params=records()[-2], context=records()[-3])), ["HVM_PARAMS after HVM_CONTEXT"]),
    ("PAGE_DATA before STATIC_DATA_END", lambda: stream(recs=records(
        sde=records()[3], pages=records()[2])), ["before STATIC_DATA_END"]),
    ("CPUID after STATIC_DATA_END", lambda: stream(recs=records(
        cpuid=b"", msr=records()[2], sde=records()[1])), ["after STATIC_DATA_END"]),
    ("no STATIC_DATA_END in v3", lambda: stream(recs=records(
        sde=b"", pages=b"")), ["END without STATIC_DATA_END"]),
    ("two STATIC_DATA_END", lambda: stream(recs=records(sde=rec(SDE) + rec(SDE))),
     ["multiple STATIC_DATA_END"]),
    ("CPU policy in v2", lambda: stream(ihdr(version=2)), ["X86_CPUID_POLICY", "v2 stream"]),
    ("STATIC_DATA_END in v2", lambda: stream(ihdr(version=2), recs=records(cpuid=b"", msr=b"")),
     ["STATIC_DATA_END record in a v2 stream"]),
    ("PV record in HVM stream", lambda: stream(recs=records(tsc=rec(7, bytes(PAGE)))),
     ["SHARED_INFO in an x86 HVM stream"]),
    ("TOOLSTACK record", lambda: stream(recs=records(tsc=rec(TOOLSTACK, b"tool"))),
     ["TOOLSTACK"]),
    ("oversized record", lambda: stream(recs=records(
        tsc=rec(HVM_CONTEXT, length=(128 << 20) + 8))), ["exceeds the maximum"]),
]


@pytest.mark.parametrize("build,expected", [(b, e) for _, b, e in CORRUPTIONS],
                         ids=[name for name, _, _ in CORRUPTIONS])
def test_corruption_rejected(build: Callable[[], bytes], expected: list[str]) -> None:
    data = build()
    with pytest.raises(StreamCheckError) as info:
        check_stream(data)
    message = str(info.value)
    assert message.startswith("offset "), message
    assert 0 <= info.value.offset <= len(data)
    for needle in expected:
        assert needle in message, message


# -- suspend images: the Xenops record as sexplib's machine printer writes it ------
GOOD_RECORD = b'((time 20261123T10:00:00Z)(word_size 64)(vm_str"{\\"name\\": \\"vm\\"}")(xs_subtree()))'
BAD_RECORDS = [
    ("JSON", b'{"name": "vm"}', "not the machine-form S-expression"),
    ("space before a quoted atom", GOOD_RECORD.replace(b'(vm_str"', b'(vm_str "'), "machine-form"),
    ("fields out of order", b"((word_size 64)(time 20261123T10:00:00Z)(xs_subtree()))", "machine-form"),
    ("no xs_subtree", b"((time 20261123T10:00:00Z)(word_size 64))", "machine-form"),
    ("word_size 32", b"((time 20261123T10:00:00Z)(word_size 32)(xs_subtree()))", "word_size 32"),
    ("quoted where bare", b'((time 20261123T10:00:00Z)(word_size 64)(vm_str"abc")(xs_subtree()))',
     "quoted where the printer leaves it bare"),
    ("hex escape", b'((time 20261123T10:00:00Z)(word_size 64)(vm_str"a\\x20b")(xs_subtree()))',
     "escape"),
]


def image(record: bytes, after: bytes = b"") -> bytes:
    body = stream()
    return (b"XenSavedDomv2-\n" + struct.pack("<qq", 0xF, len(record)) + record + struct.pack("<qq", 0xF0, 0)
            + body + struct.pack("<qq", 0xF00, 3) + b"dm!" + struct.pack("<qq", 0xFFFF, 0) + after)


def test_suspend_image_accepted() -> None:
    summary = check_image(image(GOOD_RECORD))
    assert summary["headers"] == ["Xenops", "Libxc", "Qemu_trad", "End_of_image"]
    assert summary["xenops"]["vm_str"] == b'{"name": "vm"}'
    no_vm_str = b"((time 20261123T10:00:00Z)(word_size 64)(xs_subtree()))"
    assert check_image(image(no_vm_str))["xenops"]["vm_str"] is None


@pytest.mark.parametrize("record,expected", [(r, e) for _, r, e in BAD_RECORDS], ids=[n for n, _, _ in BAD_RECORDS])
def test_suspend_image_record_rejected(record: bytes, expected: str) -> None:
    with pytest.raises(StreamCheckError) as info:
        check_image(image(record))
    assert expected in str(info.value)


def test_suspend_image_trailing_bytes_rejected() -> None:
    with pytest.raises(StreamCheckError, match="bytes after End_of_image"):
        check_image(image(GOOD_RECORD, after=b"x"))
