"""Feature negotiation: a source that would send in-band records asks the destination first.

A destination that accepts them gets them; one that does not (`serve --no-in-band`, the
xenopsd.conf key), or offers nothing (an older receiver: 404), or answers what cannot be used,
gets the stream method with one warning line; memory arrives page-exact either way. A VM that
cannot go stays running on the source.
"""
from __future__ import annotations

import json
import shutil
import socket

import pytest
import refpeer
from conftest import HostDir
from tcpproxy import TcpProxy
from test_migration import pages, vm_create
from test_xenopsd_protocol import addr, metadata

FEATURES = b"GET /services/xenops/features "


class FeaturesProxy(TcpProxy):
    """Forwards every connection to a real `serve`, but answers the features route itself with
    `answer` (then keeps the connection open when `hold`, as a destination that stalls does);
    `answer` None forwards it too. `asked`: how many features requests came."""

    def __init__(self, upstream: str, answer: bytes | None, hold: bool = False) -> None:
        self.answer = answer
        self.hold = hold
        self.asked = 0
        super().__init__(upstream)

    def _pump(self, client: socket.socket, server: socket.socket) -> None:
        head = b""
        try:
            while b"\r\n\r\n" not in head and (chunk := client.recv(1 << 16)):
                head += chunk
            self.asked += head.startswith(FEATURES)
            if head.startswith(FEATURES) and self.answer is not None:
                client.sendall(self.answer)
                if self.hold:
                    self._stop.wait()
                client.close()
                return
            server.sendall(head)
        except OSError:
            return
        super()._pump(client, server)


def in_band_source(host: HostDir, extra_conf: str = "") -> None:
    """`compress` means xenguest's in-band records on this host."""
    (host.root / "xenopsd.conf").write_text(f"migration-compressor = xenguest\n{extra_conf}")


def migrate(source: HostDir, dest: str, *extra: str, check: bool = True, env: dict | None = None):
    out = source.shim("vm-migrate", "vm1", "--dest", dest, "--compress", "--json", *extra, check=check,
                      env={**source.env, **(env or {})})
    assert "Traceback" not in out.stderr, out.stderr
    return out


def warnings(stderr: str) -> list[str]:
    return [line.split(" warning: ", 1)[1] for line in stderr.splitlines()]


def test_a_destination_that_accepts_in_band_gets_it(hosts, receiver):
    a, b = hosts("A"), hosts("B")
    in_band_source(a)
    r = receiver(b)
    vm_create(a, "vm1", "32M")
    before = pages(a, "vm1")
    out = migrate(a, r.address)
    summary = json.loads(out.stdout)
    assert out.stderr == ""
    assert summary["mode"] == summary["method"] == summary["method_requested"] == "xenguest"
    assert summary["method_reason"] == f"destination {r.address} (version 0.1.0) accepts in-band compressed records"
    # It also takes delta records: the cache's bound is the VM's memory (under the 64M default).
    assert summary["emu_manager_argv"][-4:] == ["-compress", "true", "-delta-cache", str(32 << 20)]
    assert summary["delta"]["cache_bound_bytes"] == 32 << 20
    assert pages(b, "vm1") == before and a.vms() == []
    assert "asked for the features this host accepts" in r.log
    assert f"migrating VM vm1 with xenguest: {summary['method_reason']}" in (a.root / "xenopsd.log").read_text()


@pytest.mark.parametrize("how", ["option", "config"])
def test_a_destination_without_in_band_gets_stream_with_one_warning(hosts, receiver, how):
    a, b = hosts("A"), hosts("B")
    in_band_source(a)
    if how == "config":
        (b.root / "xenopsd.conf").write_text("migration-accept-in-band = false\n")
    r = receiver(b, *(["--no-in-band"] if how == "option" else []))
    vm_create(a, "vm1", "32M")
    before = pages(a, "vm1")
    out = migrate(a, r.address)
    summary = json.loads(out.stdout)
    reason = (f"destination {r.address} (version 0.1.0) does not accept in-band compressed records "
              "(COMPRESSED_PAGE_DATA)")
    assert warnings(out.stderr) == [f"migrating VM vm1 with stream, not xenguest: {reason}"]
    assert len(out.stderr.splitlines()) == 1
    assert (summary["mode"], summary["method"], summary["method_requested"]) == ("stream", "stream", "xenguest")
    assert summary["method_reason"] == reason and "-compress" not in summary["emu_manager_argv"]
    assert pages(b, "vm1") == before and a.vms() == []
    assert "(compress=zstd)" in r.log


@pytest.mark.parametrize("answer, hold, why", [
    (b"HTTP/1.1 404 Not Found\r\nUser-agent: xenopsd\r\n\r\n", False, "publishes no features (an older receiver)"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", False, "gave no usable features answer (not JSON)"),
    (b'HTTP/1.1 200 OK\r\n\r\n{"compression": "xenguest"}', False,
     "gave no usable features answer (field 'compression' is not a list of str)"),
    (b'HTTP/1.1 200 OK\r\n\r\n{"record_types": [19, true]}', False,
     "gave no usable features answer (field 'record_types' is not a list of int)"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 100000000\r\n\r\n{", False,
     "gave no usable features answer (an answer of 100000000 bytes (at most 16384 are read))"),
    (b"HTTP/1.1 200 OK\r\n\r\n" + b"[" * 20000, False,
     "gave no usable features answer (an answer longer than 16384 bytes)"),
    (b"HTTP/1.1 500 Internal Server Error\r\n\r\n", False,
     "gave no usable features answer (status 'HTTP/1.1 500 Internal Server Error')"),
    (b"", True, "gave no usable features answer (timed out waiting for the destination's answer)"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\n{", True,
     "gave no usable features answer (timed out waiting for the answer's body)"),
    (b"\x15\x03\x03\x00\x02\x02\x46", False, "gave no usable features answer (connection closed while waiting "
                                            "for the destination's answer)"),
], ids=["404", "not-json", "not-a-list", "bool-as-int", "oversized", "unbounded", "500", "silent", "slow-body",
        "garbage"])
def test_a_destination_that_offers_nothing_usable_counts_as_plain_and_stream(hosts, receiver, answer, hold, why):
    """An older receiver (404) and an answer that cannot be used: stream, one warning, no hang."""
    a, b = hosts("A"), hosts("B")
    in_band_source(a, "migration-connect-timeout = 2\n")
    r = receiver(b)
    proxy = FeaturesProxy(r.address, answer, hold)
    try:
        vm_create(a, "vm1", "16M")
        before = pages(a, "vm1")
        out = migrate(a, proxy.address)
    finally:
        proxy.close()
    summary = json.loads(out.stdout)
    reason = f"destination {proxy.address} {why}: treated as accepting only none and stream"
    assert warnings(out.stderr) == [f"migrating VM vm1 with stream, not xenguest: {reason}"], out.stderr
    assert (summary["method"], summary["method_reason"]) == ("stream", reason) and proxy.asked == 1
    assert pages(b, "vm1") == before and a.vms() == []


def test_unknown_fields_are_ignored(hosts, receiver):
    a, b = hosts("A"), hosts("B")
    in_band_source(a)
    r = receiver(b)
    doc = json.dumps({"version": "9.0", "compression": ["none", "xenguest", "something-new"], "record_types": [19],
                      "in_band_algorithms": ["lz4", "zstd"], "future": {"nested": [1, 2]}}).encode()
    proxy = FeaturesProxy(r.address, b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(doc), doc))
    try:
        vm_create(a, "vm1", "16M")
        before = pages(a, "vm1")
        summary = json.loads(migrate(a, proxy.address).stdout)
    finally:
        proxy.close()
    assert summary["method"] == "xenguest" and "(version 9.0) accepts" in summary["method_reason"]
    assert pages(b, "vm1") == before


@pytest.mark.parametrize("compress", ["--no-compress", "stream"])
def test_methods_every_receiver_reads_are_not_negotiated(hosts, receiver, compress):
    """none and stream need nothing of the destination: no round trip is spent on asking."""
    a, b = hosts("A"), hosts("B")
    if compress == "stream":
        (a.root / "xenopsd.conf").write_text("migration-compressor = stream\n")
    r = receiver(b)
    proxy = FeaturesProxy(r.address, b"HTTP/1.1 404 Not Found\r\n\r\n")
    try:
        vm_create(a, "vm1", "16M")
        out = a.shim("vm-migrate", "vm1", "--dest", proxy.address, "--json",
                     "--no-compress" if compress == "--no-compress" else "--compress")
    finally:
        proxy.close()
    summary = json.loads(out.stdout)
    method = "none" if compress == "--no-compress" else "stream"
    assert out.stderr == "" and proxy.asked == 0
    assert (summary["method"], summary["method_reason"]) == (method, f"{method} is read by every receiver "
                                                                     "(not negotiated)")


def test_the_features_route_needs_the_secret(hosts, receiver):
    """A destination with a secret tells its features only to those who hold it; a source without
    it fails as it would at point 1, before anything is held, and the VM runs on."""
    a, b = hosts("A"), hosts("B")
    in_band_source(a)
    (b.root / "migration-secret").write_text("s3cret\n")
    r = receiver(b)
    vm_create(a, "vm1", "16M")
    before = pages(a, "vm1")
    for env, how in (({}, "no"), ({"XENOPSD_MIGRATION_SECRET": "wrong"}, "a wrong")):
        out = migrate(a, r.address, check=False, env=env)
        assert out.returncode == 2 and out.stderr == (f"xenopsd-shim: migration failed: destination failed: {how} "
                                                      "migration secret; VM vm1 keeps running on this host\n")
        assert [v["state"] for v in a.vms()] == ["running"] and b.vms() == []
    assert "refused GET /services/xenops/features: no migration secret" in r.log
    summary = json.loads(migrate(a, r.address, env={"XENOPSD_MIGRATION_SECRET": "s3cret"}).stdout)
    assert summary["method"] == "xenguest" and pages(b, "vm1") == before


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is needed to make a certificate")
@pytest.mark.parametrize("in_band", [True, False])
def test_negotiation_over_tls(hosts, receiver, tmp_path, in_band):
    from test_tls import self_signed
    a, b = hosts("A"), hosts("B")
    in_band_source(a)
    crt, key = self_signed(tmp_path, "xenmig-test")
    r = receiver(b, "--tls-cert", str(crt), "--tls-key", str(key), *([] if in_band else ["--no-in-band"]))
    vm_create(a, "vm1", "16M")
    before = pages(a, "vm1")
    out = migrate(a, r.address, "--tls-ca", str(crt))
    assert json.loads(out.stdout)["method"] == ("xenguest" if in_band else "stream")
    assert len(out.stderr.splitlines()) == (0 if in_band else 1)
    assert pages(b, "vm1") == before


def test_an_older_host_refuses_in_band_records_sent_without_asking(hosts, receiver, tmp_path):
    """A sender that does not ask (the reference peer) and sends in-band records to `serve
    --no-in-band` fails as it would against a xenguest from before them: one line, nothing left."""
    a, b = hosts("A"), hosts("B")
    (a.root / "xenopsd.conf").write_text("migration-compressor = xenguest\n")
    r = receiver(b, "--no-in-band")
    vm_create(a, "vm1", "16M")
    [vm] = a.vms()
    image = tmp_path / "vm1.img"
    a.shim("vm-suspend", "vm1", "--to", str(image), "--compress")
    cookies = {"memory_limit": str(vm["memory_bytes"]), "vm_metadata": metadata(vm)}
    with pytest.raises(refpeer.PeerError, match="point 4: .*unknown mandatory record type 0x00000013 at offset"):
        refpeer.send_vm(addr(r.address), vm["uuid"], image, cookies)
    assert b.vms() == []


def test_a_bad_accept_in_band_value_is_one_line(hosts):
    b = hosts("B")
    (b.root / "xenopsd.conf").write_text("migration-accept-in-band = maybe\n")
    out = b.shim("serve", "--listen", "127.0.0.1:0", check=False, timeout=30)
    assert out.returncode == 1 and out.stderr == (f"Error: {b.root / 'xenopsd.conf'}: migration-accept-in-band "
                                                  "must be true or false, not 'maybe'\n")
