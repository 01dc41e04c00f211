"""`xenguest -mode inspect` and `-mode convert` as processes: on bare streams, zstd files and suspend images."""
from __future__ import annotations

import json
import re
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import zstandard

from conftest import HostDir
from streamcheck import check_file, check_stream
from test_xenguest import _first, _records, restore, save

ZSTD = "/usr/bin/zstd"
COMPRESSED = 0x13
PAGE = 4096
RECORD_LINE = re.compile(r"^ *(\d+)  (.{22}) +(\d+)(?:  (.*))?$")
TOTALS = re.compile(r"^totals: records (\d+), pages (\d+), zero pages (\d+), page data on the wire (\d+) bytes, "
                    r"inflated (\d+) bytes, ratio ([\d.]+|inf|-)$")
RATIO = re.compile(r"ratio ([\d.]+)")


@dataclass
class Streams:
    plain: Path
    packed: Path            # in-band compressed (COMPRESSED_PAGE_DATA)
    digests: list[str]      # the source domain's pages when it was saved


@pytest.fixture(scope="module")
def streams(tmp_path_factory) -> Streams:
    root = tmp_path_factory.mktemp("src")
    h = HostDir(root)
    domid = h.create("vm", "32M", image="mixed")
    plain, packed = root / "plain.xc", root / "packed.xc"
    save(h, domid, plain)
    save(h, domid, packed, "-compress", "true")
    digests = h.page_digests(domid)
    h.xenemu("destroy", str(domid))
    return Streams(plain, packed, digests)


def inspect(host: HostDir, path: Path, check: bool = True) -> subprocess.CompletedProcess:
    with open(path, "rb") as f:
        return host.run("xenguest", "-mode", "inspect", "-fd", "0", stdin=f, check=check)


def convert(host: HostDir, src: Path, dst: Path, check: bool = True) -> subprocess.CompletedProcess:
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        return host.run("xenguest", "-mode", "convert", "-fd", "0", "-outfd", str(fout.fileno()), stdin=fin,
                        pass_fds=(fout.fileno(),), check=check)


def records(out: str) -> list[tuple[int, str, int, str]]:
    return [(int(m[1]), m[2].rstrip(), int(m[3]), m[4] or "") for m in map(RECORD_LINE.match, out.splitlines()) if m]


def totals(out: str) -> dict[str, float]:
    m = next(filter(None, map(TOTALS.match, out.splitlines())))
    keys = ("records", "pages", "zero", "wire", "inflated")
    return {**dict(zip(keys, map(int, m.groups()[:5]))), "ratio": float(m[6])}


def zstd_file(src: Path) -> Path:
    dst = src.with_name(src.name + ".zst")
    subprocess.run([ZSTD, "--fast", "-q", "-f", str(src), "-o", str(dst)], check=True)
    return dst


def assert_one_error(proc: subprocess.CompletedProcess) -> None:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc
    assert len(lines) == 1 and lines[0].startswith("xenguest: error: invalid stream: "), proc.stderr


# -- inspect -----------------------------------------------------------------------
def test_inspect_plain_stream(hosts, streams):
    proc = inspect(hosts(), streams.plain)
    recs, t = records(proc.stdout), totals(proc.stdout)
    assert proc.stdout.startswith("input: libxc stream\n") and "zstd" not in proc.stdout
    assert [r[1] for r in recs][:3] == ["x86 CPUID policy", "x86 MSR policy", "Static data end"]
    assert recs[0][0] == 40 and recs[-1][1] == "End" and recs[-1][0] == streams.plain.stat().st_size - 8
    assert [off for off, *_ in recs] == [off for off, _, _ in _records(streams.plain.read_bytes())]
    pages = [r for r in recs if r[1] == "Page data"]
    assert len(pages) == 8 and all(r[3] == "pfns 1024" for r in pages)
    assert "Compressed" not in proc.stdout
    assert t == {"records": len(recs), "pages": 8192, "zero": 0, "wire": 8192 * PAGE, "inflated": 8192 * PAGE,
                 "ratio": 1.0}


def test_inspect_compressed_stream(hosts, streams):
    proc = inspect(hosts(), streams.packed)
    recs, t = records(proc.stdout), totals(proc.stdout)
    packed = [r for r in recs if r[1] == "Compressed page data"]
    assert packed, proc.stdout
    for _, _, length, detail in packed:
        ratio = float(RATIO.search(detail)[1])
        payload = int(re.search(r"payload (\d+)", detail)[1])
        assert ratio > 1 and payload < length
    assert recs[-1][1] == "End" and recs[-1][0] == streams.packed.stat().st_size - 8
    assert t["pages"] == 8192 and t["inflated"] == 8192 * PAGE and t["zero"] > 0
    assert t["wire"] < t["inflated"] and t["ratio"] > 1


def test_inspect_zstd_file_matches_the_uncompressed_one(hosts, streams):
    h = hosts()
    direct, via_zstd = inspect(h, streams.packed).stdout, inspect(h, zstd_file(streams.packed)).stdout
    first, rest = via_zstd.split("\n", 1)
    assert "zstd-compressed as a whole (legacy stream method)" in first
    assert rest == direct.split("\n", 1)[1]


# -- convert -------------------------------------------------------------------------
def test_convert_gives_upstream_stream_that_restores_page_identical(hosts, streams, tmp_path):
    b = hosts("B")
    out = tmp_path / "converted.xc"
    convert(b, streams.packed, out)
    summary = check_file(out)
    assert summary["pages"] == 8192
    assert {name for name, _ in summary["records"]} <= {"X86_CPUID_POLICY", "X86_MSR_POLICY", "STATIC_DATA_END",
                                                        "PAGE_DATA", "X86_TSC_INFO", "HVM_CONTEXT",
                                                        "HVM_PARAMS", "END"}
    dst = b.empty("vm", "32M")
    restore(b, dst, out)
    assert b.page_digests(dst) == streams.digests


def test_convert_zstd_file_writes_decompressed_converted_output(hosts, streams, tmp_path):
    h = hosts()
    convert(h, streams.packed, tmp_path / "a.xc")
    convert(h, zstd_file(streams.packed), tmp_path / "b.xc")
    assert (tmp_path / "b.xc").read_bytes() == (tmp_path / "a.xc").read_bytes()


HAND_PFNS = np.array([7, 3, (0xF << 60) | 9, 5], dtype="<u8")       # entry 2 is XTAB: no data
HAND_ZERO = [False, True, False, False]
HAND_PAGES = [bytes([1]) * PAGE, bytes([4]) * PAGE]                 # the data of entries 0 and 3


def hand_stream(streams: Streams, path: Path, extra: bytes = b"") -> int:
    """The compressed stream with one record built from the documented layout, spliced in after
    STATIC_DATA_END; `extra` is appended to its payload. Returns the record's offset."""
    payload = zstandard.ZstdCompressor(write_checksum=True).compress(b"".join(HAND_PAGES)) + extra
    bitmap = bytes([sum(1 << i for i, z in enumerate(HAND_ZERO) if z)]).ljust(8, b"\0")
    body = struct.pack("<IHHII", 4, 1, 0, 1, len(payload)) + HAND_PFNS.tobytes() + bitmap + payload
    record = struct.pack("<II", COMPRESSED, len(body)) + body + bytes(-len(body) % 8)
    data = streams.packed.read_bytes()
    off, _ = _first(data, 0x10)
    path.write_bytes(data[:off + 8] + record + data[off + 8:])
    return off + 8


def test_convert_keeps_every_pfn_entry_and_zero_pages(hosts, streams, tmp_path):
    at = hand_stream(streams, tmp_path / "hand.xc")
    out = tmp_path / "out.xc"
    convert(hosts(), tmp_path / "hand.xc", out)
    converted = out.read_bytes()
    check_stream(converted)
    rtype, length = struct.unpack_from("<II", converted, at)
    want = struct.pack("<II", 4, 0) + HAND_PFNS.tobytes() + HAND_PAGES[0] + bytes(PAGE) + HAND_PAGES[1]
    assert (rtype, length) == (1, len(want)) and converted[at + 8:at + 8 + length] == want


def test_payload_with_data_after_its_frame_is_refused(hosts, streams, tmp_path):
    hand_stream(streams, tmp_path / "hand.xc", extra=bytes(8))
    assert_one_error(inspect(hosts(), tmp_path / "hand.xc", check=False))


@pytest.mark.parametrize("kind", ["algorithm", "zero-count", "payload-length", "frame-magic", "frame-size",
                                  "frame-checksum"])
def test_corrupted_compressed_record_exits_2_with_one_line(hosts, streams, tmp_path, kind):
    d = bytearray(streams.packed.read_bytes())
    off, length = _first(bytes(d), COMPRESSED)
    body = off + 8
    count, _, _, zero_count, payload_length = struct.unpack_from("<IHHII", d, body)
    frame = body + length - payload_length
    if kind == "algorithm":
        struct.pack_into("<H", d, body + 4, 2)
    elif kind == "zero-count":
        struct.pack_into("<I", d, body + 8, zero_count + 1)
    elif kind == "payload-length":
        struct.pack_into("<I", d, body + 12, payload_length - 1)
    elif kind == "frame-magic":
        d[frame] ^= 0xFF
    elif kind == "frame-checksum":        # the content checksum, the frame's last 4 bytes
        d[body + length - 1] ^= 0x01
    else:                   # the frame claims one page too many: refused before inflating
        params = zstandard.get_frame_parameters(bytes(d[frame:frame + 18]))
        size = params.content_size
        fhd = d[frame + 4]
        assert fhd >> 6 == 2, "content size stored in 4 bytes"
        at = frame + 5 + (0 if fhd & 0x20 else 1) + [0, 1, 2, 4][fhd & 3]
        assert struct.unpack_from("<I", d, at)[0] == size
        struct.pack_into("<I", d, at, size + PAGE)
    bad = tmp_path / "bad.xc"
    bad.write_bytes(d)
    h = hosts()
    assert_one_error(inspect(h, bad, check=False))
    assert_one_error(convert(h, bad, tmp_path / "out.xc", check=False))
    assert "COMPRESSED_PAGE_DATA" in inspect(h, bad, check=False).stderr


def test_garbage_and_truncated_input(hosts, streams, tmp_path):
    h = hosts()
    (tmp_path / "junk").write_bytes(b"hello world\n" * 10)
    (tmp_path / "short.xc").write_bytes(streams.packed.read_bytes()[:5_000_000])
    (tmp_path / "trailing.xc").write_bytes(streams.plain.read_bytes() + b"x")
    for name in ("junk", "short.xc", "trailing.xc"):
        assert_one_error(inspect(h, tmp_path / name, check=False))


# -- suspend images -------------------------------------------------------------------
def header(htype: int, length: int = 0) -> bytes:
    return struct.pack("<qq", htype, length)


def xenops_record(vm_str: str | None) -> bytes:
    """The record in sexplib's machine form, as written from the field table in suspend_image.ml by hand."""
    quoted = "" if vm_str is None else '(vm_str"' + vm_str.replace("\\", "\\\\").replace('"', '\\"') + '")'
    return f"((time 20261123T10:00:00Z)(word_size 64){quoted}(xs_subtree()))".encode()


def suspend_image(libxc_stream: bytes) -> tuple[bytes, bytes, bytes]:
    """(framing before the libxc stream, the stream, framing after it), built by hand."""
    vm = xenops_record(json.dumps({"name": "vm", "uuid": "0d6f7b1e-4c1a-4c59-9b0f-0a3c5e6f7a8b",
                                   "memory_bytes": 32 << 20}))
    qemu = b"device model state\x00\x01"
    before = b"XenSavedDomv2-\n" + header(0x000F, len(vm)) + vm + header(0x00F0)
    after = header(0x0F00, len(qemu)) + qemu + header(0xFFFF)
    return before, libxc_stream, after


def test_convert_suspend_image_keeps_framing_byte_for_byte(hosts, streams, tmp_path):
    before, stream, after = suspend_image(streams.packed.read_bytes())
    src = tmp_path / "vm.img"
    src.write_bytes(before + stream + after)
    h = hosts()
    out = tmp_path / "converted.img"
    convert(h, src, out)
    converted = out.read_bytes()
    summary = check_stream(converted, offset=len(before), allow_trailing=True)
    assert summary["pages"] == 8192
    assert converted[:len(before)] == before
    assert converted[len(before) + summary["length"]:] == after
    # The legacy whole-image zstd gives the same output.
    convert(h, zstd_file(src), tmp_path / "via-zstd.img")
    assert (tmp_path / "via-zstd.img").read_bytes() == converted


def test_inspect_suspend_image(hosts, streams, tmp_path):
    before, stream, after = suspend_image(streams.packed.read_bytes())
    src = tmp_path / "vm.img"
    src.write_bytes(before + stream + after)
    out = inspect(hosts(), src).stdout
    lines = out.splitlines()
    assert lines[0] == "input: suspend image"
    assert any(x.endswith('image header Xenops, length 163: time 20261123T10:00:00Z, word_size 64, vm_str "{\\"name\\": '
                          '\\"vm\\", \\"uuid\\": \\"0d6f7b1e-4c1a-4c59-9b0f-0a3c5e6f7a8b\\", '
                          '\\"memory_bytes\\": 33554432}", xs_subtree of 0 entries') for x in lines), out
    assert any("image header Libxc" in x for x in lines)
    assert any("image header Qemu_trad, length 20: device-model state, skipped" in x for x in lines)
    assert "image header End_of_image" in lines[-3]
    recs = records(out)
    assert recs[0][0] == len(before) + 40 and recs[-1][1] == "End"
    assert totals(out)["pages"] == 8192


def test_usage(hosts):
    h = hosts()
    for argv in (["-mode", "save", "-fd", "3"], ["-mode", "convert", "-fd", "0"], ["-mode", "inspect"]):
        proc = h.run("xenguest", *argv, check=False)
        assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
