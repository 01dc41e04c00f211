"""DELTA_PAGE_DATA as processes: xenguest -mode save with -delta-cache, restore, inspect, convert;
page-exact against the domain's digests, the cache's bound in its figures and the process's RSS,
and damaged delta records refused with one line (docs/delta-page-data.md)."""
from __future__ import annotations

import json
import re
import struct
import sys
from pathlib import Path

import pytest
import zstandard

from conftest import HostDir, stream_fd
from streamcheck import StreamCheckError, check_file, check_stream
from test_inspect_convert import convert, inspect
from test_xenguest import _records, restore_refused

DELTA, COMPRESSED, PAGE_DATA, STATIC_DATA_END, PAGE = 0x14, 0x13, 0x01, 0x10, 4096
HEADER = "<IHHII"
PASS = re.compile(r"pass (\{.*\})$", re.M)
MIB = 1 << 20


def save(host: HostDir, domid: int, out: Path, *extra: str, env: dict | None = None,
         rate: int | None = None) -> list[dict]:
    """A live in-band save with -debug, into `out` (through a link of `rate` bytes/s if given);
    its XENMIG_ITERATION figures, pass by pass."""
    with stream_fd(out, rate) as fd:
        proc = host.run("xenguest", "-mode", "save", "-domid", str(domid), "-fd", str(fd), "-live",
                        "-compress", "true", "-debug", *extra, pass_fds=(fd,), env={**host.env, **(env or {})})
    return [json.loads(m) for m in PASS.findall(proc.stderr)]


def restored(host: HostDir, stream: Path, memory: str, env: dict | None = None) -> list[str]:
    dst = host.empty("vm", memory)
    with open(stream, "rb") as f:
        host.run("xenguest", "-mode", "restore", "-domid", str(dst), "-fd", "0", stdin=f,
                 env={**host.env, **(env or {})})
    digests = host.page_digests(dst)
    host.xenemu("destroy", str(dst))
    return digests


def records_of(data: bytes, rtype: int) -> list[tuple[int, int]]:
    return [(off, length) for off, t, length in _records(data) if t == rtype]


def test_increment_guest_goes_as_deltas_page_exact(hosts, tmp_path):
    a, b = hosts("A"), hosts("B")
    src = a.create("vm", "32M", image="mixed", workload="increment:100MB/s")
    stream = tmp_path / "vm.xc"
    passes = save(a, src, stream, "-delta-cache", str(64 * MIB))
    assert len(passes) >= 3, passes
    first, later = passes[0], passes[1:]
    assert first["delta_pages"] == 0 and first["cache_hits"] == 0, first
    assert sum(p["delta_pages"] for p in later) > 0 and all(p["cache_misses"] == 0 for p in later), later
    assert all(p["delta_pages"] <= p["cache_hits"] <= p["pages"] for p in later), later
    assert sum(p["delta_saved_bytes"] for p in later) > 0, later
    # one byte a page changed: the later passes cost under 0.05x what iteration 0 paid per page compressed
    per_page = first["wire_bytes"] / first["pages"]
    assert sum(p["wire_bytes"] for p in later) <= 0.05 * per_page * sum(p["pages"] for p in later), passes
    assert a.domains()[0]["state"] == "paused"         # memory now is the pause point
    assert restored(b, stream, "32M") == a.page_digests(src)
    out = inspect(a, stream).stdout
    lines = [line for line in out.splitlines() if "Delta page data" in line and "pfns" in line]
    assert lines and all("base crcs ok" in line for line in lines), out
    assert len(records_of(stream.read_bytes(), DELTA)) == len(lines)
    upstream = tmp_path / "upstream.xc"
    convert(a, stream, upstream)
    check_file(upstream)
    assert restored(b, upstream, "32M") == a.page_digests(src)
    check_stream(stream.read_bytes(), inband=True)


@pytest.mark.parametrize("mode", ["on", "auto"])
def test_dirty_guest_with_deltas_is_page_exact(hosts, tmp_path, mode):
    """`auto` over a 30 MB/s link (where compressing pays, so deltas may too)."""
    a, b = hosts("A"), hosts("B")
    src = a.create("vm", "32M", image="mixed", workload="dirty:50MB/s")
    stream = tmp_path / "vm.xc"
    passes = save(a, src, stream, "-delta-cache", str(16 * MIB), env={"XENGUEST_COMPRESS_MODE": mode},
                  rate=30_000_000 if mode == "auto" else None)
    assert all(p["mode"] == mode for p in passes), passes
    assert sum(p["cache_hits"] for p in passes[1:]) > 0, passes
    assert all(p["delta_pages"] <= p["cache_hits"] and p["cache_peak_bytes"] <= 16 * MIB for p in passes), passes
    assert restored(b, stream, "32M") == a.page_digests(src)
    check_stream(stream.read_bytes(), inband=True)


def test_delta_cache_0_sends_no_deltas(hosts, tmp_path):
    a = hosts("A")
    src = a.create("vm", "16M", image="mixed", workload="increment:100MB/s")
    stream = tmp_path / "vm.xc"
    passes = save(a, src, stream, "-delta-cache", "0")
    assert len(passes) >= 2
    fields = ("delta_pages", "cache_hits", "cache_misses", "cache_bytes", "cache_peak_bytes", "delta_saved_bytes")
    assert all(p[key] == 0 for p in passes for key in fields), passes
    assert not records_of(stream.read_bytes(), DELTA)


def test_negative_delta_cache_is_a_usage_error(hosts, tmp_path):
    proc = hosts().run("xenguest", "-mode", "save", "-domid", "1", "-fd", "1", "-delta-cache", "-5", check=False)
    assert proc.returncode == 1 and proc.stderr.strip().splitlines() == [
        "xenguest: -delta-cache must be a size in bytes, 0 or more (not -5)"], proc.stderr


PEAK_RSS = ("import resource, subprocess, sys; subprocess.run(sys.argv[2:], check=True, pass_fds=(int(sys.argv[1]),)); "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")


def peak_rss(host: HostDir, domid: int, out: Path, cache: int) -> tuple[int, list[dict]]:
    """The save's figures and its xenguest's peak RSS in bytes (the only child of a wrapper)."""
    with open(out, "wb") as f:
        proc = host.run(sys.executable, "-c", PEAK_RSS, str(f.fileno()), str(Path(sys.executable).parent / "xenguest"),
                        "-mode", "save", "-domid", str(domid), "-fd", str(f.fileno()), "-live", "-compress", "true",
                        "-debug", "-delta-cache", str(cache), pass_fds=(f.fileno(),),
                        env={**host.env, "XENGUEST_COMPRESS_THREADS": "1"})
    return 1024 * int(proc.stdout.split()[-1]), [json.loads(m) for m in PASS.findall(proc.stderr)]


def test_tiny_cache_stays_within_its_bound(hosts, tmp_path):
    """1 MiB for a 64 MiB guest: the figures never above it, the process no bigger than without a
    cache but for a batch's copies; a cache that holds the guest shows in the RSS, so the RSS sees it."""
    a, b = hosts("A"), hosts("B")
    rss, figures, domids = {}, {}, {}
    for cache in (0, MIB, 80 * MIB):
        domids[cache] = src = a.create(f"vm{cache}", "64M", image="mixed", workload="increment:100MB/s")
        rss[cache], figures[cache] = peak_rss(a, src, tmp_path / f"{cache}.xc", cache)
    # a cache that evicts all along still equals what the receiver holds
    assert restored(b, tmp_path / f"{MIB}.xc", "64M") == a.page_digests(domids[MIB])
    print(f"\npeak RSS by cache bound: { {k: v // MIB for k, v in rss.items()} } MiB")
    tiny = figures[MIB]
    assert all(p["cache_bytes"] <= p["cache_peak_bytes"] <= MIB for p in tiny), tiny
    assert tiny[-1]["cache_peak_bytes"] > MIB // 2, tiny                 # it did fill its slots
    assert rss[MIB] - rss[0] < 24 * MIB, rss                            # a batch's snapshots, not a cache
    assert rss[80 * MIB] - rss[MIB] > 48 * MIB, rss                      # a full cache is real memory
    # zero pages hold no slot: how many the guest has not written yet when pass 0 reaches them
    # depends on the pass's speed
    assert figures[80 * MIB][0]["cache_peak_bytes"] > 48 * MIB


# -- damaged delta records ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def delta_stream(tmp_path_factory) -> bytes:
    root = tmp_path_factory.mktemp("delta")
    h = HostDir(root)
    domid = h.create("vm", "16M", image="mixed", workload="increment:100MB/s")
    path = root / "vm.xc"
    passes = save(h, domid, path, "-delta-cache", str(16 * MIB))
    assert sum(p["delta_pages"] for p in passes) > 0, passes
    h.xenemu("destroy", str(domid))
    return path.read_bytes()


def with_delta(data: bytes, change) -> bytes:
    """The stream with its first DELTA_PAGE_DATA body replaced by change(body)."""
    off, length = records_of(data, DELTA)[0]
    body = change(bytearray(data[off + 8:off + 8 + length]))
    record = struct.pack("<II", DELTA, len(body)) + body + bytes(-len(body) % 8)
    return data[:off] + record + data[off + 8 + length + (-length % 8):]


def _meta(body: bytes) -> int:
    count = struct.unpack_from(HEADER, body)[0]
    return 16 + 8 * count + (8 * count + 7 & ~7)


def _set(field: int, value: int):
    def change(body: bytearray) -> bytearray:
        struct.pack_into("<I", body, field, value)
        return body
    return change


def _flip(where) -> callable:
    def change(body: bytearray) -> bytearray:
        body[where(body)] ^= 0x01
        return body
    return change


def _frame(new) -> callable:
    """The payload replaced by new(deltas): its length field follows."""
    def change(body: bytearray) -> bytearray:
        meta = _meta(body)
        deltas = zstandard.ZstdDecompressor().decompress(bytes(body[meta:]))
        payload = new(deltas, bytes(body[meta:]))
        struct.pack_into("<I", body, 8, len(payload))
        return body[:meta] + payload
    return change


def _first_pfn_entry_to(pfn: int):
    def change(body: bytearray) -> bytearray:
        struct.pack_into("<Q", body, 16, pfn)
        return body
    return change


def _before_page_data(data: bytes) -> bytes:
    """The first delta record moved to right after STATIC_DATA_END: no page of it sent yet."""
    off, length = records_of(data, DELTA)[0]
    size = 8 + length + (-length % 8)
    record, rest = data[off:off + size], data[:off] + data[off + size:]
    (end_off, _), = records_of(rest, STATIC_DATA_END)
    return rest[:end_off + 8] + record + rest[end_off + 8:]


def _compress(data: bytes) -> bytes:
    return zstandard.ZstdCompressor(write_checksum=True).compress(data)


DAMAGE = {
    "bad-base-crc": (_flip(lambda b: 16 + 8 * struct.unpack_from(HEADER, b)[0]), "the receiver does not hold"),
    "bad-result-crc": (_flip(lambda b: 16 + 12 * struct.unpack_from(HEADER, b)[0]), "fails its crc32"),
    "truncated-frame": (_frame(lambda deltas, frame: frame[:len(frame) // 2]), "DELTA_PAGE_DATA payload"),
    "wrong-size": (_frame(lambda deltas, frame: _compress(deltas[:-PAGE])), "frame claims"),
    "checksum-mismatch": (_frame(lambda deltas, frame: frame[:-1] + bytes([frame[-1] ^ 0x10])), "checksum mismatch"),
    "unknown-algorithm": (lambda b: b[:4] + struct.pack("<H", 2) + b[6:], "algorithm 2 is unknown"),
    "count-0": (_set(0, 0), "with 0 pfns"),
    "count-1025": (_set(0, 1025), "with 1025 pfns"),
    "reserved": (_set(12, 1), "reserved field is not zero"),
    "pfn-twice": (lambda b: _first_pfn_entry_to(struct.unpack_from("<Q", b, 24)[0])(b), "names a pfn twice"),
}


def damaged(kind: str, data: bytes) -> bytes:
    if kind == "no-base":
        return _before_page_data(data)
    return with_delta(data, DAMAGE[kind][0])


WORDS = {**{k: v[1] for k, v in DAMAGE.items()}, "no-base": "never sent (no base)"}


@pytest.mark.parametrize("kind", WORDS)
def test_damaged_delta_record_fails_restore_with_one_line(hosts, tmp_path, delta_stream, kind):
    bad = tmp_path / "bad.xc"
    bad.write_bytes(damaged(kind, delta_stream))
    restore_refused(hosts("B"), bad, WORDS[kind])    # nothing half-restored: the VM stays on the source
    with pytest.raises(StreamCheckError):
        check_stream(bad.read_bytes(), inband=True)


def test_delta_stream_accepted_by_the_checker(delta_stream):
    summary = check_stream(delta_stream, inband=True)
    assert summary["delta_records"] > 0
    with pytest.raises(StreamCheckError, match="0x00000014|0x00000013"):
        check_stream(delta_stream)             # as Xen's verifier: our records are unknown to it


@pytest.mark.parametrize("env", ["XENGUEST_REFUSE_DELTA", "XENGUEST_REFUSE_COMPRESSED"])
def test_old_receiver_refuses_deltas_with_one_line(hosts, tmp_path, delta_stream, env):
    stream = tmp_path / "vm.xc"
    stream.write_bytes(delta_stream)
    word = "0x00000013" if env == "XENGUEST_REFUSE_COMPRESSED" else "0x00000014"   # the first it does not know
    b = hosts("B")
    dst = b.empty("vm", "16M")
    with open(stream, "rb") as f:
        proc = b.run("xenguest", "-mode", "restore", "-domid", str(dst), "-fd", "0", stdin=f, check=False,
                     env={**b.env, env: "1"})
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert f"unknown mandatory record type {word}" in lines[0], proc.stderr
    assert b.domains() == []


# -- convert: bases from the stream, or from -base --------------------------------------------
def test_convert_resolves_deltas_with_and_without_base(hosts, tmp_path, delta_stream):
    """A stream cut after iteration 0 (its deltas' bases gone) converts only with -base, the
    memory iteration 0 sent; the whole stream converts alone. Both restore page-exact."""
    a = hosts("A")
    whole = tmp_path / "whole.xc"
    whole.write_bytes(delta_stream)
    upstream = tmp_path / "upstream.xc"
    convert(a, whole, upstream)
    check_file(upstream)
    expected = restored(a, whole, "16M")
    assert restored(a, upstream, "16M") == expected
    # iteration 0: the first page records, 4096 pages; its memory as a raw image
    plain = upstream.read_bytes()
    base, sent, first_records = bytearray(16 * MIB), 0, 0
    for off, rtype, length in _records(plain):
        if rtype != PAGE_DATA or sent == 4096:
            continue
        count = struct.unpack_from("<I", plain, off + 8)[0]
        pfns = struct.unpack_from(f"<{count}Q", plain, off + 16)
        data = off + 16 + 8 * count
        for i, pfn in enumerate(pfns):
            base[PAGE * pfn:PAGE * (pfn + 1)] = plain[data + PAGE * i:data + PAGE * (i + 1)]
        sent += count
        first_records += 1
    assert sent == 4096
    page_records = [(off, length) for off, rtype, length in _records(delta_stream) if rtype in (PAGE_DATA, COMPRESSED)]
    cut_from = page_records[0][0]
    cut_to = page_records[first_records - 1][0] + 8 + page_records[first_records - 1][1]
    cut_to += -cut_to % 8
    cut = tmp_path / "cut.xc"
    cut.write_bytes(delta_stream[:cut_from] + delta_stream[cut_to:])
    image = tmp_path / "base.img"
    image.write_bytes(base)
    proc = convert(a, cut, tmp_path / "out.xc", check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and re.search(r"delta for pfn \d+ needs its base: give -base",
                                                                  lines[0]), proc.stderr
    resolved = tmp_path / "resolved.xc"
    with open(cut, "rb") as fin, open(resolved, "wb") as fout:
        a.run("xenguest", "-mode", "convert", "-fd", "0", "-outfd", str(fout.fileno()), "-base", str(image),
              stdin=fin, pass_fds=(fout.fileno(),))
    check_file(resolved)
    # the same PAGE_DATA records as the whole stream's after iteration 0, byte for byte
    assert page_bodies(resolved.read_bytes()) == page_bodies(plain)[first_records:]
    out = inspect(a, cut).stdout
    assert "bases of" in out and "not in this stream" in out, out


def page_bodies(data: bytes) -> list[bytes]:
    return [data[off:off + 8 + length] for off, rtype, length in _records(data) if rtype == PAGE_DATA]
