"""xenguest as a process: save and restore through real fds, page-exact, and bad streams."""
from __future__ import annotations

import re
import struct
import time
from pathlib import Path

import pytest

from conftest import HostDir
from streamcheck import check_file

ITERATIONS = re.compile(r"iterations (\d+), pages (\d+), bytes (\d+), per iteration \[([\d, ]*)\]")


def save(host: HostDir, domid: int, out: Path, *extra: str) -> re.Match:
    with open(out, "wb") as f:
        proc = host.run("xenguest", "-mode", "save", "-domid", str(domid), "-fd", str(f.fileno()), *extra,
                        pass_fds=(f.fileno(),))
    m = ITERATIONS.search(proc.stderr)
    assert m, proc.stderr
    return m


def restore(host: HostDir, domid: int, stream: Path, check: bool = True):
    with open(stream, "rb") as f:
        return host.run("xenguest", "-mode", "restore", "-domid", str(domid), "-fd", "0", stdin=f, check=check)


def test_256m_save_restore_on_second_host(hosts, tmp_path):
    a, b = hosts("A"), hosts("B")
    src = a.create("vm", "256M", image="mixed")
    stream = tmp_path / "vm.xc"
    t0 = time.monotonic()
    save(a, src, stream)
    dst = b.empty("vm", "256M")
    restore(b, dst, stream)
    elapsed = time.monotonic() - t0
    print(f"\n256 MiB save+restore: {elapsed:.2f} s wall, stream {stream.stat().st_size} bytes")
    assert b.page_digests(dst) == a.page_digests(src)
    assert b.context_digests(dst) == a.context_digests(src, libxc_only=True)
    assert [d["state"] for d in b.domains()] == ["paused"]
    summary = check_file(stream)
    assert summary["pages"] == 65536


@pytest.mark.parametrize("workload", ["increment", "dirty:50MB/s"])
def test_live_save_is_exact_at_pause_point(hosts, tmp_path, workload):
    a, b = hosts("A"), hosts("B")
    src = a.create("vm", "128M", image="mixed", workload=workload)
    time.sleep(0.5)
    stream = tmp_path / "vm.xc"
    m = save(a, src, stream, "-live", "true")
    per_iteration = [int(x) for x in m.group(4).split(",")]
    assert len(per_iteration) > 2 and per_iteration[1] > 0, per_iteration   # pre-copy really iterated
    assert int(m.group(2)) > 32768                                           # pages were resent
    assert a.domains()[0]["state"] == "paused"     # save paused it: memory now is the pause point
    dst = b.empty("vm", "128M")
    restore(b, dst, stream)
    src_pages, dst_pages = a.page_digests(src), b.page_digests(dst)
    wrong = [pfn for pfn, (x, y) in enumerate(zip(src_pages, dst_pages)) if x != y]
    assert not wrong, f"{len(wrong)} pages differ, first pfns {wrong[:5]}"
    check_file(stream)


def test_compressed_stream_round_trip(hosts, tmp_path):
    a, b = hosts("A"), hosts("B")
    src = a.create("vm", "64M", image="mixed", workload="dirty:20MB/s")
    plain, packed = tmp_path / "plain.xc", tmp_path / "packed.xc"
    save(a, src, packed, "-live", "true", "-compress", "true")
    dst = b.empty("vm", "64M")
    restore(b, dst, packed)
    assert b.page_digests(dst) == a.page_digests(src)
    a.xenemu("unpause", str(src))
    save(a, src, plain)
    assert packed.stat().st_size < 0.8 * plain.stat().st_size


# -- bad input -------------------------------------------------------------------
def _records(data: bytes) -> list[tuple[int, int, int]]:
    """(offset, type, length) of each record after the two headers."""
    out, off = [], 24 + 16
    while off < len(data):
        rtype, length = struct.unpack_from("<II", data, off)
        out.append((off, rtype, length))
        off += 8 + length + (-length % 8)
        if rtype == 0:
            break
    return out


def _first(data: bytes, rtype: int) -> tuple[int, int]:
    return next((off, length) for off, t, length in _records(data) if t == rtype)


def corrupt(kind: str, data: bytes) -> bytes:
    d = bytearray(data)
    if kind == "magic":
        d[0] = 0
    elif kind == "ident":
        d[8:12] = b"XENX"
    elif kind == "version":
        struct.pack_into("!I", d, 12, 9)
    elif kind == "reserved-option":
        struct.pack_into("!H", d, 16, 2)
    elif kind == "page-shift":
        struct.pack_into("<H", d, 24 + 4, 16)
    elif kind == "truncated":
        d = d[:len(d) // 2]
    elif kind == "record-length":
        off, length = _first(data, 1)
        struct.pack_into("<I", d, off + 4, length - 4096)
    elif kind == "huge-length":
        off, _ = _first(data, 1)
        struct.pack_into("<I", d, off + 4, 0xFFFFFFF0)
    elif kind == "padding":
        off, length = _first(data, 9)     # HVM_CONTEXT: pad it with a non-zero byte
        if length % 8 == 0:
            pytest.skip("context happens to need no padding")
        d[off + 8 + length] = 1
    elif kind == "unknown-mandatory":
        off, _ = _first(data, 16)
        d[off:off] = struct.pack("<II", 0x7000, 8) + bytes(8)
    elif kind == "pfn-reserved-bits":
        off, _ = _first(data, 1)
        pfn0 = struct.unpack_from("<Q", d, off + 16)[0]
        struct.pack_into("<Q", d, off + 16, pfn0 | (1 << 55))
    elif kind == "pfn-beyond-domain":
        off, _ = _first(data, 1)
        struct.pack_into("<Q", d, off + 16, 1 << 40)
    elif kind == "page-count-zero":
        off, _ = _first(data, 1)
        struct.pack_into("<I", d, off + 8, 0)
    elif kind == "missing-end":
        off, _ = _first(data, 0)
        d = d[:off]
    else:
        raise AssertionError(kind)
    return bytes(d)


BAD = ["magic", "ident", "version", "reserved-option", "page-shift", "truncated", "record-length", "huge-length",
       "padding", "unknown-mandatory", "pfn-reserved-bits", "pfn-beyond-domain", "page-count-zero", "missing-end"]


@pytest.fixture(scope="module")
def small_stream(tmp_path_factory) -> bytes:
    from conftest import HostDir

    root = tmp_path_factory.mktemp("src")
    h = HostDir(root)
    domid = h.create("vm", "16M", image="mixed")
    path = root / "vm.xc"
    save(h, domid, path)
    h.xenemu("destroy", str(domid))
    return path.read_bytes()


@pytest.mark.parametrize("kind", BAD)
def test_bad_stream_clear_error_and_nothing_left(hosts, tmp_path, small_stream, kind):
    b = hosts("B")
    dst = b.empty("vm", "16M")
    bad = tmp_path / "bad.xc"
    bad.write_bytes(corrupt(kind, small_stream))
    proc = restore(b, dst, bad, check=False)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "invalid stream" in lines[0] and "Traceback" not in proc.stderr, proc.stderr
    assert b.domains() == []            # no half-restored domain left in the host


def test_stream_into_smaller_domain_is_refused(hosts, tmp_path, small_stream):
    b = hosts("B")
    dst = b.empty("vm", "8M")
    (tmp_path / "s.xc").write_bytes(small_stream)
    proc = restore(b, dst, tmp_path / "s.xc", check=False)
    assert proc.returncode == 2 and "beyond the domain" in proc.stderr
    assert b.domains() == []


def test_unknown_optional_record_is_skipped(hosts, tmp_path, small_stream):
    d = bytearray(small_stream)
    off, _ = _first(small_stream, 16)
    d[off:off] = struct.pack("<II", 0x80001234, 5) + b"hello" + bytes(3)
    (tmp_path / "s.xc").write_bytes(d)
    b = hosts("B")
    dst = b.empty("vm", "16M")
    restore(b, dst, tmp_path / "s.xc")
    assert b.domains()[0]["state"] == "paused"


def test_usage_errors_exit_1(hosts):
    h = hosts()
    for argv in (["-mode", "save", "-domid", "1"], ["-mode", "fly", "-domid", "1"], ["-domid", "x"],
                 ["-mode", "save", "-domid", "1", "-fd", "3", "-live", "yes"], ["-bogus", "1"]):
        proc = h.run("xenguest", *argv, check=False)
        assert proc.returncode == 1 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr


def test_restore_into_running_domain_is_refused(hosts, small_stream, tmp_path):
    h = hosts()
    domid = h.create("vm", "16M")
    (tmp_path / "s.xc").write_bytes(small_stream)
    proc = restore(h, domid, tmp_path / "s.xc", check=False)
    assert proc.returncode == 2 and "restore needs a new domain" in proc.stderr
    assert h.domains()[0]["state"] == "running"




def test_listen_removes_its_socket_on_sigterm(hosts):
    """Stopped by SIGTERM before any emu-manager came, `xenguest -mode listen` removes its control
    socket (as on SIGINT) and exits with one line, instead of dying and leaving it in the run dir."""
    import signal
    import subprocess

    from conftest import exe

    a = hosts("A")
    listen = subprocess.Popen([exe("xenguest"), "-mode", "listen", "-domid", "7", "-controloutfd", "2"],
                              env=a.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert listen.stdout is not None and listen.stdout.readline() == "Ready\n"
    assert (a.root / "run" / "xenguest-control-7").exists()
    listen.send_signal(signal.SIGTERM)
    _, err = listen.communicate(timeout=30)
    assert listen.returncode == 2 and err.strip().endswith("interrupted") and len(err.splitlines()) == 1, err
    assert list((a.root / "run").iterdir()) == []
