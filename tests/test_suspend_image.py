"""The suspend image as the real xenopsd frames it (suspend_image.ml, xc/domain.ml): the Xenops record
as an S-expression, every header type read, skipped or refused as restore_common does, and
End_of_image on the vGPU fd. vm-suspend, vm-resume, inspect and vm-migrate run as processes."""
from __future__ import annotations

import json
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import BIN, HostDir
from streamcheck import check_image

SIGNATURE = b"XenSavedDomv2-\n"
XENOPS, LIBXC, LIBXL, LIBXC_LEGACY, QEMU_TRAD, QEMU_XEN = 0x000F, 0x00F0, 0x00F1, 0x00F2, 0x0F00, 0x0F01
VARSTORED, SWTPM0, SWTPM, END_OF_IMAGE = 0x0F11, 0x0F12, 0x0F13, 0xFFFF


def header(htype: int, length: int = 0) -> bytes:
    return struct.pack("<qq", htype, length)


@dataclass
class Saved:
    raw: bytes
    uuid: str
    digests: list[str]
    xenops_end: int             # offset after the Xenops record: the Libxc header
    qemu_at: int                # offset of the Qemu_trad header


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Saved:
    """One VM suspended by vm-suspend, checked against the independent checker."""
    root = tmp_path_factory.mktemp("src")
    h = HostDir(root)
    uuid = h.shim("vm-create", "vm1", "--memory", "8M").stdout.strip()
    digests = h.shim("vm-digest", "vm1", "--pages").stdout.splitlines()
    h.shim("vm-suspend", "vm1", "--to", str(root / "vm1.img"))
    raw = (root / "vm1.img").read_bytes()
    summary = check_image(raw)
    assert summary["headers"] == ["Xenops", "Libxc", "Qemu_trad", "End_of_image"]
    length = struct.unpack_from("<q", raw, len(SIGNATURE) + 8)[0]
    xenops_end = len(SIGNATURE) + 16 + length
    qemu_at = xenops_end + 16 + summary["libxc"]["length"]
    assert struct.unpack_from("<q", raw, qemu_at)[0] == QEMU_TRAD
    return Saved(raw, uuid, digests, xenops_end, qemu_at)


def inspect(host: HostDir, path: Path) -> subprocess.CompletedProcess:
    with open(path, "rb") as f:
        return host.run("xenguest", "-mode", "inspect", "-fd", "0", stdin=f, check=False)


def one_line(proc: subprocess.CompletedProcess, code: int) -> str:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == code and len(lines) == 1 and "Traceback" not in proc.stderr, proc
    return lines[0]


def no_vm(host: HostDir) -> None:
    assert host.vms() == []
    assert json.loads(host.xenemu("list", "--json")) == []


def test_vm_suspend_writes_the_record_sexplib_prints_and_resumes_page_exact(hosts, saved, tmp_path):
    rec = check_image(saved.raw)["xenops"]
    assert rec["word_size"] == 64
    meta = json.loads(rec["vm_str"])
    assert meta == {"name": "vm1", "uuid": saved.uuid, "memory_bytes": 8 << 20, "workload": "none",
                    "vgpu_bytes": 0}
    record = saved.raw[len(SIGNATURE) + 16:saved.xenops_end]
    assert record.startswith(b"((time 20") and record.endswith(b")(xs_subtree()))")
    assert b'(word_size 64)(vm_str"{\\"memory_bytes\\": 8388608, \\"name\\": \\"vm1\\", ' in record
    (tmp_path / "vm1.img").write_bytes(saved.raw)
    b = hosts("B")
    out = inspect(b, tmp_path / "vm1.img").stdout.splitlines()
    assert out[2] == (f"          15  image header Xenops, length {len(record)}: time {rec['time']}, word_size 64, "
                      f'vm_str "{json.dumps(meta, sort_keys=True).replace(chr(34), chr(92) + chr(34))}", '
                      "xs_subtree of 0 entries")
    assert b.shim("vm-resume", str(tmp_path / "vm1.img")).stdout.strip() == saved.uuid
    assert b.shim("vm-digest", "vm1", "--pages").stdout.splitlines() == saved.digests


# Records a real xenopsd may write: no vm_str (xenopsd before vm_str), its own VM sexp as vm_str.
REAL_RECORDS = [
    (b"((time 20240101T00:00:00Z)(word_size 64)(xs_subtree()))", "no vm_str",
     "the Xenops record has no vm_str: this project builds the VM from the metadata it keeps there"),
    (b'((time 20240101T00:00:00Z)(word_size 64)(vm_str"((id 3f0a2c1e-0000-0000-0000-000000000001)'
     b'(name vm)(ssidref 0))")(xs_subtree()))',
     'vm_str "((id 3f0a2c1e-0000-0000-0000-000000000001)(name vm)(ssidref 0))"',
     "the Xenops record's vm_str is not this project's VM metadata"),
]
# Records Xenops_record.of_string refuses: the restore fails.
MALFORMED_RECORDS = [
    (b'{"name": "vm1"}', "Xenops record is not a valid S-expression: more than one S-expression"),
    (b"((time 1)(word_size 64)", "Xenops record is not a valid S-expression: unbalanced '('"),
    (b"(" * 100_000, "nested deeper than 64"),
    (b"; c\n((time 1)(word_size 64))", "comments are not supported"),
    (b"((time 1)(word_size 64)(vm 1))", "Xenops record has an unknown field 'vm'"),
    (b"((time 1)(word_size 64)(time 2))", "Xenops record has field time twice"),
    (b"((time 1))", "Xenops record has no word_size"),
]


def with_record(saved: Saved, path: Path, record: bytes) -> Path:
    path.write_bytes(SIGNATURE + header(XENOPS, len(record)) + record + saved.raw[saved.xenops_end:])
    return path


def test_records_a_real_xenopsd_writes_are_shown_but_not_resumed(hosts, saved, tmp_path):
    h = hosts()
    for record, shown, error in REAL_RECORDS:
        path = with_record(saved, tmp_path / "x.img", record)
        assert error in one_line(h.shim("vm-resume", str(path), check=False), 2)
        no_vm(h)
        proc = inspect(h, path)         # a valid record: inspect shows it and walks the whole image
        assert proc.returncode == 0, proc.stderr
        assert f"image header Xenops, length {len(record)}: time 20240101T00:00:00Z, word_size 64, {shown}, " \
               "xs_subtree of 0 entries" in proc.stdout


@pytest.mark.parametrize("cases", [pytest.param(MALFORMED_RECORDS[:2], id="default"),
                                   pytest.param(MALFORMED_RECORDS[2:], id="more", marks=pytest.mark.slow)])
def test_malformed_records_fail_the_restore_in_one_line(hosts, saved, tmp_path, cases):
    h = hosts()
    for record, error in cases:
        path = with_record(saved, tmp_path / "x.img", record)
        assert error in one_line(h.shim("vm-resume", str(path), check=False), 2)
    no_vm(h)
    proc = inspect(h, path)
    assert error in one_line(proc, 2) and "image header Xenops" not in proc.stdout


def test_varstored_and_swtpm_records_are_read_and_skipped(hosts, saved, tmp_path):
    """xc/domain.ml writes them before the Qemu record for a UEFI guest; restore_common reads each whole."""
    extra = header(VARSTORED, 5) + b"efi\x00\x01" + header(SWTPM0, 2) + b"t0" + header(SWTPM, 3) + b"tpm"
    path = tmp_path / "uefi.img"
    path.write_bytes(saved.raw[:saved.qemu_at] + extra + saved.raw[saved.qemu_at:])
    h = hosts()
    out = inspect(h, path).stdout
    for line in ("image header Varstored, length 5: UEFI variables, skipped (no varstored here)",
                 "image header Swtpm0, length 2: vTPM state (first format), skipped (no swtpm here)",
                 "image header Swtpm, length 3: vTPM state, skipped (no swtpm here)"):
        assert line in out, out
    h.shim("vm-resume", str(path))
    assert h.shim("vm-digest", "vm1", "--pages").stdout.splitlines() == saved.digests


def test_libxc_legacy_header_is_restored_as_libxc(hosts, saved, tmp_path):
    """restore_common sends restore:xenguest for Libxc_legacy as for Libxc."""
    path = tmp_path / "legacy.img"
    at = saved.xenops_end
    path.write_bytes(saved.raw[:at] + header(LIBXC_LEGACY) + saved.raw[at + 16:])
    h = hosts()
    assert "image header Libxc_legacy, length 0: a libxc stream follows" in inspect(h, path).stdout
    h.shim("vm-resume", str(path))
    assert h.shim("vm-digest", "vm1", "--pages").stdout.splitlines() == saved.digests


REFUSED = {
    "libxl": (lambda s: s.raw[:s.xenops_end] + header(LIBXL) + s.raw[s.xenops_end:], "image header Libxl",
              "Libxl records are not supported (the real xenopsd fails the restore on them too)"),
    "qemu-xen": (lambda s: s.raw[:s.qemu_at] + header(QEMU_XEN, 4) + b"qemu" + s.raw[s.qemu_at:],
                 "image header Qemu_xen", "Qemu_xen records are not supported"),
    "unknown-type": (lambda s: s.raw[:s.qemu_at] + header(0x0F14, 1) + b"x" + s.raw[s.qemu_at:], None,
                     "unknown suspend image header type 0xf14"),
    "legacy-signature": (lambda s: b"XenSavedDomain\n" + s.raw[len(SIGNATURE):], None,
                         "a legacy (pre-Xen-4.5) suspend image"),
    "no-libxc": (lambda s: s.raw[:s.xenops_end] + s.raw[s.qemu_at:], "image header End_of_image",
                 "well formed, but useless stream"),
}


@pytest.mark.parametrize("cases", [pytest.param(["libxl", "no-libxc"], id="default"),
                                   pytest.param(["qemu-xen", "unknown-type", "legacy-signature"], id="more",
                                                marks=pytest.mark.slow)])
def test_header_types_the_real_reader_refuses(hosts, saved, tmp_path, cases):
    h = hosts()
    for case in cases:
        build, shown, error = REFUSED[case]
        path = tmp_path / f"{case}.img"
        path.write_bytes(build(saved))
        assert error in one_line(h.shim("vm-resume", str(path), check=False), 2), case
        no_vm(h)
        proc = inspect(h, path)
        if case == "no-libxc":              # valid framing: inspect shows it all
            assert proc.returncode == 0 and shown in proc.stdout
            continue
        assert one_line(proc, 2).startswith("xenguest: error: invalid stream: ")
        if shown:                           # inspect names the header before it stops
            assert shown in proc.stdout.splitlines()[-1], case


# A source whose writer leaves out the vGPU fd's footer (the only lone End_of_image header it writes).
NO_VGPU_FOOTER = """
import sys
import xenopsd_shim.imagewriter as w
from xenmig import image
real = w.write_all
w.write_all = lambda fd, bufs: None if list(bufs) == [image.build_header(image.END_OF_IMAGE)] else real(fd, bufs)
from xenopsd_shim.cli import main
sys.argv[0] = "xenopsd-shim"
main()
"""


def test_vgpu_stream_ends_with_end_of_image_and_the_receiver_requires_it(hosts, receiver):
    a, b = hosts("A"), hosts("B")
    r = receiver(b)
    a.shim("vm-create", "gpu", "--memory", "8M", "--vgpu", "4M")
    a.shim("vm-create", "gpu2", "--memory", "8M", "--vgpu", "4M")
    vgpu = a.shim("vm-digest", "gpu").stdout
    a.shim("vm-migrate", "gpu", "--dest", r.address, "--non-live")
    assert b.shim("vm-digest", "gpu").stdout == vgpu
    bad = subprocess.run([str(Path(BIN) / "python"), "-c", NO_VGPU_FOOTER, "vm-migrate", "gpu2", "--dest", r.address,
                          "--non-live"], env=a.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         timeout=300)
    error = one_line(bad, 2)
    # The source ends the vGPU connection after its part (point 2), so the receiver sees the end at once.
    assert error == ("xenopsd-shim: migration failed: destination failed to start the VM: restore failed: the vGPU "
                     "stream ended without End_of_image after the vGPU state; VM gpu2 keeps running on this host"), error
    assert [v["name"] for v in a.vms()] == ["gpu2"]
    assert [v["name"] for v in b.vms()] == ["gpu"]
