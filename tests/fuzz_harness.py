"""The fuzz's harness: runs the receiving side on an input and checks what it must always do.

`resume` runs `xenopsd-shim vm-resume FILE`; `Serve` migrates the same bytes into a running
`xenopsd-shim serve` as a source would (the requests and handshake messages with
xenopsd_shim.transport's own builders and readers). Both watch the memory of the receiving
process tree (PeakRss) and what it leaves behind; `exercise` is one fuzz example, `run_fuzz` the
loop, `make_seeds` the seed images.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import zstandard
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from conftest import HostDir, assert_clean, exe, processes_of
from fuzz_model import MEMORY, Image, Seeds, parse_image, with_deltas
from fuzz_mutators import mutate
from xenemu import Host
from xenmig import compressed, image
from xenopsd_shim import transport
from xenopsd_shim.policy import SERVE_ADDRESS

TIMEOUT = 60.0
RSS_BOUND_MIB = 200
TREE_BOUND_MIB = 300


COUNTS: dict[str, int] = {}
PEAKS: dict[str, tuple[float, str]] = {}      # path -> (MiB, input kind): the largest seen


def count(key: str) -> None:
    COUNTS[key] = COUNTS.get(key, 0) + 1


# Running the receiving side ----------------------------------------------------------
def vm_hwm_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def role(proc: psutil.Process) -> str:
    try:
        cmd = proc.cmdline()
    except psutil.Error:
        return "?"
    names = [os.path.basename(c) for c in cmd[:2]]
    return names[1] if len(names) > 1 and names[0].startswith("python") else names[0] if names else "?"


class PeakRss:
    """Per-process peak RSS (VmHWM, kept by the kernel) of a process tree, read every 20 ms
    while it runs; a process is missed only if it lives less than one period."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peaks: dict[int, tuple[str, int]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            self.sample()
            if self._stop.wait(0.02):
                return

    def sample(self) -> None:
        try:
            root = psutil.Process(self.pid)
            tree = [root, *root.children(recursive=True)]
        except psutil.Error:
            return
        for proc in tree:
            kib = vm_hwm_kib(proc.pid)
            name = self.peaks.get(proc.pid, (None, 0))[0] or role(proc)
            if kib >= self.peaks.get(proc.pid, ("", 0))[1]:
                self.peaks[proc.pid] = (name, kib)

    def stop(self) -> dict[str, float]:
        self.sample()
        self._stop.set()
        self._thread.join()
        return self.summary()

    def summary(self) -> dict[str, float]:
        by_role: dict[str, float] = {}
        for name, kib in self.peaks.values():
            by_role[name] = max(by_role.get(name, 0), kib / 1024)
        return by_role

    def tree_mib(self) -> float:
        return sum(kib for _, kib in self.peaks.values()) / 1024


def check_memory(path: str, kind: str, peaks: dict[str, float], tree: float) -> None:
    worst = max(peaks.values(), default=0.0)
    if worst > PEAKS.get(path, (0.0, ""))[0]:
        PEAKS[path] = (worst, f"{kind}: {max(peaks, key=peaks.get)}")
    assert worst < RSS_BOUND_MIB, f"{path}: peak RSS {peaks} MiB over the bound of {RSS_BOUND_MIB} MiB ({kind})"
    assert tree < TREE_BOUND_MIB, f"{path}: process tree peaks sum to {tree:.0f} MiB ({kind})"


def kill_tree(pid: int) -> None:
    try:
        root = psutil.Process(pid)
        procs = [*root.children(recursive=True), root]
    except psutil.Error:
        return
    for p in procs:
        try:
            p.kill()
        except psutil.Error:
            pass


def domains_of(root: Path) -> list[dict]:
    """What `xenemu list` and `xenopsd-shim vm-list` read (the CLIs are run once per test, not per input)."""
    return [d.describe() for d in Host(root).domains()]


def no_domains_cli(h: HostDir) -> None:
    assert h.vms() == []
    assert json.loads(h.xenemu("list", "--json")) == []


@dataclass
class Outcome:
    ok: bool                 # resumed / migrated: the VM runs
    detail: str
    peak: dict[str, float]
    tree: float
    accepted: bool = False   # serve: restored the whole image (its first Success), commit or not


def resume(h: HostDir, path: Path, kind: str) -> Outcome:
    """`xenopsd-shim vm-resume FILE`; a success is checked and its VM destroyed."""
    proc = subprocess.Popen([exe("xenopsd-shim"), "vm-resume", str(path)], env=h.env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    rss = PeakRss(proc.pid)
    try:
        out, err = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        proc.communicate()
        rss.stop()
        pytest.fail(f"vm-resume hung for {TIMEOUT:g} s")
    peak = rss.stop()
    check_memory("vm-resume", kind, peak, rss.tree_mib())
    assert "Traceback" not in err, err
    doms = domains_of(h.root)
    if proc.returncode == 0:
        assert err == "", err
        [d] = doms
        assert d["uuid"] == out.strip() and d["state"] == "running", (d, out)
        Host(h.root).find(d["uuid"]).destroy()
        assert domains_of(h.root) == []
    else:
        lines = err.splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("xenopsd-shim: "), \
            (proc.returncode, err)
        assert doms == [], f"failed resume left {doms}"
    assert_clean(h.root)
    return Outcome(proc.returncode == 0, err.strip() or out.strip(), peak, rss.tree_mib())


class Serve:
    """A `xenopsd-shim serve` (the conftest fixture), its process tree's memory and its clean state."""

    def __init__(self, h: HostDir, receiver) -> None:
        self.h = h
        self.r = receiver(h)
        self.rss = PeakRss(self.r.proc.pid)

    def alive(self) -> None:
        """The receiver still runs, logged no traceback, and answers a new request."""
        assert self.r.proc.poll() is None, f"serve died: {self.r.log[-2000:]}"
        assert "Traceback" not in self.r.log and "Exception in thread" not in self.r.log, self.r.log[-3000:]
        with socket.create_connection(self.addr(), timeout=TIMEOUT) as s:
            s.sendall(b"GET /services/xenops/nothing HTTP/1.1\r\nHost: x\r\n\r\n")
            assert transport.recv_line(s, TIMEOUT, "the answer to a new request").startswith("HTTP/1.1 404 ")

    def addr(self) -> tuple[str, int]:
        host, port = self.r.address.rsplit(":", 1)
        return host, int(port)

    def clean(self) -> None:
        """Nothing of the host left but `serve` itself and its address file."""
        deadline = time.monotonic() + 15
        while True:
            left = [p for p in processes_of(self.h.root) if p.pid != self.r.proc.pid]
            files = [f for f in (self.h.root / "run").glob("*") if f.name != SERVE_ADDRESS]
            if not left and not files:
                return
            assert time.monotonic() < deadline, f"left behind: {[p.cmdline() for p in left]}, {files}"
            time.sleep(0.1)

    def migrate(self, raw: bytes, img: Image, commit: bool) -> Outcome:
        """Migrate the image in as a source would; `commit`: send point 3 after the image, else
        close our side after it (a source that is gone), so a reader waiting for more sees the end."""
        before = dict(self.rss.peaks)
        deadline = time.monotonic() + TIMEOUT
        log = self.h.root / "xenopsd.log"
        log_from = log.stat().st_size if log.exists() else 0     # a source port recurs in a long run
        meta, limit = vm_metadata(img)
        dest_id = img.uuid[:24] + "000000000001"
        cookies = migration_cookies(img)
        vm = socket.create_connection(self.addr(), timeout=TIMEOUT)
        socks = [vm]
        tag = f"receiver[127.0.0.1:{vm.getsockname()[1]}]"
        lines: list[str] = []
        ok = False
        try:
            vm.sendall(transport.build_request("PUT", transport.MIGRATE_VM_PATH + dest_id, self.r.address,
                                               vm_cookies(cookies, meta, limit)))
            lines.append(hs_recv(vm, deadline) or "<closed>")     # point 1 (a head too long: no answer)
            if lines[-1] == "Success" and vgpu_of(meta):
                # A source with a vGPU: its connection (empty here; the image has no Demu stream).
                vg = socket.create_connection(self.addr(), timeout=TIMEOUT)
                socks.append(vg)
                vg.sendall(transport.build_request("PUT", f"{transport.MIGRATE_VGPU_PATH}{dest_id}.0", self.r.address,
                                                   {**cookies, transport.COOKIE_VGPU_MIGRATION: ""}))
                assert hs_recv(vg, deadline) == "Success"
                vm.sendall(transport.build_result(None))         # 1-vgpu ACK (serve waits for it before point 1)
                lines.append(hs_recv(vm, deadline) or "<closed>")
            if lines[-1] == "Success":
                mem = socket.create_connection(self.addr(), timeout=TIMEOUT)
                socks.append(mem)
                mem.sendall(transport.build_request("PUT", transport.MIGRATE_MEM_PATH + dest_id, self.r.address,
                                                    cookies))
                assert hs_recv(mem, deadline) == "Success"        # 1-mem
                vm.sendall(transport.build_result(None))         # 1-mem ACK
                # A partial line and then the end of the connection used to make the receiver
                # busy-wait (test_serve_notices_a_partial_line_then_close): bytes after the frame
                # that its relay feeds zstd end here, as a source's stream would.
                sender = threading.Thread(target=send_image, args=(socks[1:], raw), daemon=True)
                sender.start()
                sender.join(timeout=TIMEOUT)
                assert not sender.is_alive(), "our sender is stuck: the receiver stopped reading"
                if commit:
                    try:
                        vm.sendall(transport.build_result(None))     # point 3
                    except OSError:
                        pass          # it gave up early: its error is there to read
                else:
                    vm.shutdown(socket.SHUT_WR)
                while (answer := hs_recv(vm, deadline)) is not None:
                    lines.append(answer)
                    if answer == "Success" and commit:
                        ok = True                                 # point 4
                        break
        finally:
            for sock in socks:
                sock.close()
        # This input's processes (those whose peak moved meanwhile), and serve itself.
        self.rss.sample()
        now = dict(self.rss.peaks)          # a copy: the sampler thread goes on adding to it
        mine = {pid for pid, v in now.items() if before.get(pid) != v} | {self.r.proc.pid}
        peaks: dict[str, float] = {}
        for pid in mine & now.keys():
            name, kib = now[pid]
            peaks[name] = max(peaks.get(name, 0.0), kib / 1024)
        tree = sum(now[pid][1] for pid in mine & now.keys()) / 1024
        check_memory("serve", img.kind, peaks, tree)
        failure = [x for x in lines if x.startswith("Error: ")]
        assert len(failure) <= 1 and all("\n" not in x for x in failure), lines
        doms = domains_of(self.h.root)
        if ok:
            [d] = doms
            assert d["state"] == "running", d
            Host(self.h.root).find(d["uuid"]).destroy()
        else:
            assert doms == [], f"failed migration left {doms}: {lines}"
        self.clean()
        self.alive()
        # Restored the whole image? Its log says so (xenopsd's receiver says nothing between
        # point 1 and point 4).
        with log.open("rb") as f:
            f.seek(log_from)
            mine = [x for x in f.read().decode(errors="replace").splitlines() if f" {tag} " in x]
        warnings = [x for x in mine if f" {tag} warning: " in x]
        accepted = any("synchronisation point 2: image restored" in x for x in mine)
        return Outcome(ok, " | ".join(lines + warnings[-1:])[:400], peaks, tree, accepted=accepted)


def send_image(socks: list[socket.socket], raw: bytes) -> None:
    """The image on the mem connection (the last), then the end of it and of the vGPU one, as
    VM_migrate's save ends them."""
    try:
        socks[-1].sendall(raw)
    except OSError:
        pass        # the receiver gave up on the image and closed: its answer says why
    for sock in socks:
        try:
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass


def hs_recv(sock: socket.socket, deadline: float) -> str | None:
    """One handshake message ("Success", "Error: <text>"), or None once the receiver closed."""
    try:
        error = transport.recv_result(sock, max(0.0, deadline - time.monotonic()), "a handshake message")
    except transport.TransportError as e:
        if str(e).startswith("timed out"):
            pytest.fail(f"the receiver hung: no answer within {TIMEOUT:g} s")
        return None          # closed or reset
    return "Success" if error is None else "Error: " + error


def migration_cookies(img: Image) -> dict[str, str]:
    """The cookies every connection of a migration carries, as a source sends them."""
    return {transport.COOKIE_DBG: "fuzz", transport.COOKIE_FINAL_ID: img.uuid, transport.COOKIE_MEM_MIGRATION: "fuzz",
            **({transport.COOKIE_COMPRESS: transport.COMPRESS_ZSTD} if img.kind == "stream" else {})}


def vm_cookies(cookies: dict[str, str], meta: str, limit: int) -> dict[str, str]:
    """The vm connection's: the migration's, the memory to allocate and the VM's metadata."""
    return {**cookies, transport.COOKIE_MEMORY_LIMIT: str(limit), transport.METADATA_COOKIE: meta}


def vm_metadata(img: Image) -> tuple[str, int]:
    """The vm connection's metadata and memory_limit: the vm_str of the image's own Xenops record (a
    source sends both from the same VM; a mangled record is sent as it is), or a seed's when the
    image has none."""
    xen = [p for p in img.parts if p.htype == image.XENOPS]
    if len(xen) == 1:
        try:
            meta = image.parse_xenops_record(xen[0].payload).vm_str or ""
        except image.ImageError:
            meta = xen[0].payload.decode(errors="replace")
        try:
            rec = json.loads(meta)
            limit = rec["memory_bytes"] if isinstance(rec, dict) and isinstance(rec.get("memory_bytes"), int) \
                and 0 < rec["memory_bytes"] < 1 << 40 else MEMORY
        except (ValueError, RecursionError):
            limit = MEMORY
        return meta, limit
    return json.dumps({"name": "vm-fuzz", "uuid": img.uuid, "memory_bytes": MEMORY, "workload": "none",
                       "vgpu_bytes": 0}), MEMORY


def wait_for_log(h: HostDir, text: str, deadline: float) -> None:
    while text not in (h.root / "xenopsd.log").read_text(errors="replace"):
        if time.monotonic() > deadline:
            pytest.fail(f"the receiver never logged {text!r}")
        time.sleep(0.05)


def vgpu_of(meta: str) -> bool:
    try:
        rec = json.loads(meta)
    except (ValueError, RecursionError):
        return False
    return isinstance(rec, dict) and bool(rec.get("vgpu_bytes"))


# Seeds and the fuzz loop ---------------------------------------------------------------
def make_seeds(root: Path) -> Seeds:
    """A valid suspend image of each kind, made by vm-suspend, checked to restore page for page
    and to give back its own bytes through the model."""
    h = HostDir(root)
    check = HostDir(root / "check")
    check.root.mkdir()
    images = {}
    for kind, compressor in (("plain", None), ("inband", "xenguest"), ("stream", "stream")):
        if compressor:
            (root / "xenopsd.conf").write_text(f"migration-compressor = {compressor}\n")
        h.shim("vm-create", f"vm-{kind}", "--memory", f"{MEMORY >> 20}M", "--image", "mixed")
        digests = h.shim("vm-digest", f"vm-{kind}", "--pages").stdout
        path = root / f"{kind}.img"
        h.shim("vm-suspend", f"vm-{kind}", "--to", str(path), *(["--compress"] if compressor else []))
        # A seed restores page for page (the restorer's inflate queue included).
        check.shim("vm-resume", str(path))
        assert check.shim("vm-digest", f"vm-{kind}", "--pages").stdout == digests
        check.shim("vm-destroy", f"vm-{kind}")
        raw = path.read_bytes()
        if kind == "stream":
            assert raw[:4] == compressed.ZSTD_MAGIC
            raw = zstandard.ZstdDecompressor().decompressobj().decompress(raw)
        images[kind] = img = parse_image(raw, kind)
        round_trips = kind == "stream" or img.encode() == path.read_bytes()
        assert round_trips, f"the {kind} seed's model does not give back its bytes"
        types = {r.rtype for r in img.libxc().records}
        assert (compressed.REC_TYPE in types) == (kind == "inband"), types
        if kind == "inband":       # and with deltas after the page records: they restore to the same pages
            images["delta"] = with_deltas(img)
            (root / "delta.img").write_bytes(images["delta"].encode())
            check.shim("vm-resume", str(root / "delta.img"))
            assert check.shim("vm-digest", "vm-inband", "--pages").stdout == digests
            check.shim("vm-destroy", "vm-inband")
    assert_clean(root)
    assert_clean(check.root)
    return Seeds(images)


def reset(h: HostDir, keep: int | None = None) -> None:
    """What an earlier failing input left is gone, so that each example (and its shrinks) starts alike."""
    for d in Host(h.root).domains():
        d.destroy()
    for p in processes_of(h.root):
        if p.pid != keep:
            p.kill()


def exercise(seeds: Seeds, data, resume_host: HostDir, serve: Serve, tmp: Path) -> None:
    reset(resume_host)
    reset(serve.h, keep=serve.r.proc.pid)
    img = mutate(seeds, data)
    raw = img.encode()
    path = tmp / "fuzz.img"
    path.write_bytes(raw)
    note(f"{img.kind} image of {len(raw)} bytes")
    a = resume(resume_host, path, img.kind)
    count("resume")
    count(f"resume {'ok' if a.ok else 'refused'}")
    note(f"vm-resume: {a.detail}")
    b = serve.migrate(raw, img, commit=a.ok)
    count("serve")
    count(f"serve {'ok' if b.ok else 'refused'}")
    note(f"serve: {b.detail}")
    # Both read the image with the same ImageReader: the same verdict on it, except that serve
    # relays one zstd frame where vm-resume's zstd reads the whole file. (Bytes after End_of_image
    # can still fail the commit: serve reads them as the source's handshake line.)
    kind, resumed, accepted = img.kind, a.ok, b.accepted      # (no image in pytest's assertion report)
    if resumed:
        assert accepted, f"vm-resume accepted the image, serve refused it: {b.detail}"
    elif accepted:
        assert kind == "stream", f"serve accepted the image, vm-resume refused it: {a.detail}"


def report(test: str, started: float) -> None:
    took = time.monotonic() - started
    print(f"\nfuzz count ({test}): resume {COUNTS.get('resume', 0)} ({COUNTS.get('resume ok', 0)} resumed), "
          f"serve {COUNTS.get('serve', 0)} ({COUNTS.get('serve ok', 0)} migrated) in {took:.0f} s; "
          + "; ".join(f"peak RSS {path} {mib:.0f} MiB ({what})" for path, (mib, what) in sorted(PEAKS.items())))


FUZZ_SETTINGS = dict(deadline=None, database=None, print_blob=True,
                     suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                            HealthCheck.large_base_example])


def run_fuzz(name: str, config: settings, seeds: Seeds, hosts, receiver, tmp_path: Path, record_property) -> None:
    COUNTS.clear()
    started = time.monotonic()
    resume_host, serve_host = hosts("resume"), hosts("serve")
    serve = Serve(serve_host, receiver)

    @config
    @given(data=st.data())
    def fuzz(data) -> None:
        exercise(seeds, data, resume_host, serve, tmp_path)

    try:
        fuzz()
        # Still a working receiver: a valid image migrates.
        img = seeds.images["inband"]
        last = serve.migrate(img.encode(), img, commit=True)
        assert last.ok, last.detail
        no_domains_cli(resume_host)
        no_domains_cli(serve_host)
    finally:
        serve.rss.stop()
        report(name, started)
    record_property("fuzz_count", COUNTS.get("resume", 0))
    assert COUNTS["resume"] >= config.max_examples and COUNTS["serve"] >= config.max_examples, COUNTS
