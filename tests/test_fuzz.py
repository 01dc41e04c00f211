"""Fuzzing the readers of suspend images and libxc streams, through the real executables.

Seeds: valid suspend images of small VMs (8 MiB, profile `mixed`), made once
per module by `xenopsd-shim vm-suspend`: `plain` (PAGE_DATA), `inband`
(`migration-compressor = xenguest`: COMPRESSED_PAGE_DATA records) and
`stream` (`migration-compressor = stream`: the whole image one zstd frame).
Each example parses a seed into its structure (signature, suspend-image
headers and payloads, the Xenops record, the libxc image and domain headers,
libxc records), applies one to three mutations aimed at the fields a reader
must check (header types and lengths, Xenops fields, record types and
lengths, padding and order, PAGE_DATA counts and pfns, the compressed
record's header, bitmap and zstd frame, zstd bombs), plus byte-level ones
(truncation, bit flips, insertions, trailing data) placed mostly at
structure boundaries, and feeds the bytes

  (a) to `xenopsd-shim vm-resume FILE` on a host of its own, and
  (b) to a running `xenopsd-shim serve`, as a migration in xenopsd's protocol: the vm
      and mem PUTs on raw sockets (as transport.open_stream builds them), points 1 and
      1-mem, the image on the mem connection, points 3 and 4. The VM metadata the vm
      connection carries is the image's own Xenops record, as a source sends both.

Checked for every input: no hang (60 s); a failure exits non-zero with one
line on stderr and no traceback, and leaves no domain, no process and no run
file behind; an input that happens to be harmless resumes to a running VM
(destroyed by the test); serve restores an image that vm-resume accepted (the
test commits, the VM runs there, the test destroys it) and refuses one that
vm-resume refused (but for bytes after the first zstd frame, which only
vm-resume's zstd reads), never crashes, logs no traceback, leaves nothing
behind, and answers a new request after every input; and the receiving
processes stay under the memory bound.

Memory bound: the peak RSS (the kernel's high-water mark, VmHWM) of each
process of the receiving side (vm-resume or serve, emu-manager, xenguest,
zstd), read every 20 ms over the process tree while it runs. RSS_BOUND_MIB
bounds the largest of them and TREE_BOUND_MIB the sum of their peaks (an
upper bound of the tree's peak at any one time), whatever the input.
test_worst_inputs runs the worst ones (huge claimed lengths, zstd bombs of
1 GiB, records of the maximum length). Measured on a 2-core machine: a valid
8 MiB restore peaks at about 60 MiB (xenguest); the worst input, 16 MiB
COMPRESSED_PAGE_DATA records that are valid but slow to inflate, at about
130-140 MiB with 16 inflate threads (217 MiB before the restorer bounded its
queue by bytes); a zstd bomb at under 60 MiB.

`make test` runs FUZZ_EXAMPLES examples (15, or $FUZZ_EXAMPLES; derandomized,
so CI is reproducible); `make check-all` adds the slow variant with
FUZZ_EXAMPLES_SLOW random ones. With -s each prints its `fuzz count` and the
peaks it saw.

The image model is in fuzz_model, the mutations (and WORST) in fuzz_mutators, running
the receiving side and the fuzz loop in fuzz_harness; this module holds the tests.
"""
from __future__ import annotations

import copy
import json
import os
import socket
import subprocess
import time
from contextlib import contextmanager
from typing import Iterator

import pytest

# The helper modules assert too: their failures read as the tests' own.
pytest.register_assert_rewrite("fuzz_model", "fuzz_mutators", "fuzz_harness")

from conftest import Receiver  # noqa: E402
from fuzz_harness import (FUZZ_SETTINGS, TIMEOUT, Serve, domains_of, hs_recv, make_seeds,  # noqa: E402
                          migration_cookies, reset, resume, run_fuzz, send_image, vm_cookies, vm_metadata,
                          wait_for_log)
from fuzz_model import Seeds  # noqa: E402
from fuzz_mutators import HARMLESS, WORST  # noqa: E402
from hypothesis import settings  # noqa: E402
from xenopsd_shim import transport  # noqa: E402
from xenopsd_shim.policy import SERVE_ADDRESS  # noqa: E402

FUZZ_EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", 15))
FUZZ_EXAMPLES_SLOW = 500


@pytest.fixture(scope="module")
def seeds(tmp_path_factory) -> Seeds:
    return make_seeds(tmp_path_factory.mktemp("fuzz-seeds"))


def test_fuzz_resume_and_serve(seeds, hosts, receiver, tmp_path, record_property):
    run_fuzz("default", settings(max_examples=FUZZ_EXAMPLES, derandomize=True, **FUZZ_SETTINGS),
             seeds, hosts, receiver, tmp_path, record_property)


@pytest.mark.slow
def test_fuzz_resume_and_serve_many(seeds, hosts, receiver, tmp_path, record_property):
    run_fuzz("slow", settings(max_examples=FUZZ_EXAMPLES_SLOW, **FUZZ_SETTINGS),
             seeds, hosts, receiver, tmp_path, record_property)


@contextmanager
def serving(h) -> Iterator[Serve]:
    """A serve of its own for one test: once the test's body has passed, it kept nothing, logged
    no traceback and answers a new request; it is stopped whatever happened."""
    serve = Serve(h, lambda host: Receiver(host))
    try:
        yield serve
        serve.clean()
        assert domains_of(h.root) == []
        serve.alive()
    finally:
        serve.rss.stop()
        serve.r.proc.kill()
        serve.r.proc.wait()
        (h.root / "run" / SERVE_ADDRESS).unlink(missing_ok=True)


@pytest.mark.parametrize("where", ["request", "commit"])
def test_serve_notices_a_partial_message_then_close(seeds, hosts, where):
    """A request cut short, or half a handshake message (one byte of point 3's two) and then the
    end of the connection: the receiver notices at once, answers with its error, keeps nothing."""
    h = hosts("serve")
    img = seeds.images["plain"]
    meta, limit = vm_metadata(img)
    dest_id = img.uuid[:24] + "000000000001"
    cookies = migration_cookies(img)
    deadline = time.monotonic() + TIMEOUT
    try:
        with serving(h) as serve, socket.create_connection(serve.addr(), timeout=TIMEOUT) as sock:
            if where == "request":
                head = transport.build_request("PUT", transport.MIGRATE_VM_PATH + dest_id, "x", {})
                sock.sendall(head[:head.index(b"Host: x") + len(b"Host: x")])     # cut in its Host line
            else:
                sock.sendall(transport.build_request("PUT", transport.MIGRATE_VM_PATH + dest_id, "x",
                                                     vm_cookies(cookies, meta, limit)))
                assert hs_recv(sock, deadline) == "Success"
                with socket.create_connection(serve.addr(), timeout=TIMEOUT) as mem:
                    mem.sendall(transport.build_request("PUT", transport.MIGRATE_MEM_PATH + dest_id, "x", cookies))
                    assert hs_recv(mem, deadline) == "Success"
                    sock.sendall(transport.build_result(None))
                    send_image([mem], img.encode())
                    wait_for_log(h, "synchronisation point 2: image restored", deadline)
                sock.sendall(b"\x00")
            sock.shutdown(socket.SHUT_WR)
            sock.settimeout(3)
            rest = b""
            try:
                while chunk := sock.recv(4096):
                    rest += chunk
            except ConnectionResetError:
                pass        # it closed with our partial message unread: it noticed
            except (socket.timeout, TimeoutError):
                pytest.fail(f"the receiver did not notice within 3 s that the peer closed ({where})")
            assert where == "request" or b"Internal_error" in rest, rest
    finally:
        reset(h)



@pytest.mark.parametrize("name", sorted(WORST))
def test_worst_inputs(seeds, hosts, receiver, tmp_path, name):
    """Each input fails cleanly (or, if harmless, resumes) on both paths, within the memory bound."""
    kind, mutation, env = WORST[name]
    img = copy.deepcopy(seeds.images[kind])
    mutation(img)
    raw = img.encode()
    path = tmp_path / "worst.img"
    path.write_bytes(raw)
    serve_host, resume_host = hosts("serve"), hosts("resume")
    for h in (serve_host, resume_host):
        h.env.update(env)
    serve = Serve(serve_host, receiver)
    try:
        started = time.monotonic()
        a = resume(resume_host, path, kind)
        b = serve.migrate(raw, img, commit=a.ok)
        took = time.monotonic() - started
    finally:
        serve.rss.stop()
    print(f"\n{name}: {len(raw)} bytes, {took:.1f} s; vm-resume {'ok' if a.ok else 'refused'}, "
          f"peak RSS {max(a.peak.values()):.0f} MiB ({max(a.peak, key=a.peak.get)}), tree {a.tree:.0f} MiB; "
          f"serve {'ok' if b.ok else 'refused'}, peak RSS {max(b.peak.values()):.0f} MiB "
          f"({max(b.peak, key=b.peak.get)}), tree {b.tree:.0f} MiB\n  {a.detail[:200]}\n  {b.detail[:200]}")
    assert a.ok == (name in HARMLESS), a.detail
    assert b.ok == a.ok, b.detail
    # The other reader of images: xenguest -mode inspect, one record at a time.
    with open(path, "rb") as f:
        proc = resume_host.run("xenguest", "-mode", "inspect", "-fd", "0", stdin=f, stdout=subprocess.DEVNULL,
                               check=False, timeout=TIMEOUT)
    assert "Traceback" not in proc.stderr and proc.returncode in (0, 2), proc.stderr[-2000:]
    assert proc.returncode == 0 or len(proc.stderr.splitlines()) == 1, proc.stderr


@pytest.mark.parametrize("name", ["x" * 65, "../escape", "a/b", ""])
def test_serve_refuses_a_bad_vm_name_in_the_metadata_cookie(seeds, hosts, name):
    """The name comes from the wire: a refusal with the reason, never a thread's traceback."""
    h = hosts("serve")
    img = seeds.images["plain"]
    meta, limit = vm_metadata(img)
    doc = json.loads(meta)
    doc["name"] = name
    dest_id = img.uuid[:24] + "000000000001"
    with serving(h) as serve, socket.create_connection(serve.addr(), timeout=TIMEOUT) as sock:
        sock.sendall(transport.build_request("PUT", transport.MIGRATE_VM_PATH + dest_id, "x",
                                             vm_cookies(migration_cookies(img), json.dumps(doc), limit)))
        answer = hs_recv(sock, time.monotonic() + TIMEOUT)
        assert answer is not None and answer.startswith("Error: ") and \
            ("invalid VM name" in answer or "no VM name" in answer), answer
