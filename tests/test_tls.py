"""Optional TLS on the transport: page-exact through the tunnel, nothing readable on the wire,
and a sender that does not speak it or does not trust the receiver is refused cleanly."""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from tcpproxy import TcpProxy

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is needed to make a certificate")


def self_signed(where: Path, cn: str) -> tuple[Path, Path]:
    """(certificate, key): self-signed for 127.0.0.1, made now."""
    key, crt = where / "key.pem", where / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", str(key), "-out", str(crt), "-days", "1", "-subj", f"/CN={cn}",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
    return crt, key


@pytest.fixture
def cert(tmp_path: Path) -> tuple[Path, Path]:
    return self_signed(tmp_path, "xenmig-test")


@pytest.mark.parametrize("compress", ["--no-compress", "--compress"])
def test_tls_migration_is_page_exact_and_opaque(hosts, receiver, cert, compress):
    a, b = hosts("A"), hosts("B")
    (b.root / "migration-secret").write_text("tls-secret-42\n")
    crt, key = cert
    r = receiver(b, "--tls-cert", str(crt), "--tls-key", str(key))
    proxy = TcpProxy(r.address)
    try:
        a.shim("vm-create", "vm1", "--memory", "64M", "--image", "mixed")
        before = a.shim("vm-digest", "vm1", "--pages").stdout
        out = a.shim("vm-migrate", "vm1", "--dest", proxy.address, "--tls-ca", str(crt), "--json",
                     compress, env={**a.env, "XENOPSD_MIGRATION_SECRET": "tls-secret-42"})
        summary = json.loads(out.stdout)
        assert summary["status"] == "success" and summary["mode"] == ("stream" if compress == "--compress" else "none")
        assert a.vms() == [] and b.shim("vm-digest", "vm1", "--pages").stdout == before
        # Through the proxy went TLS records only: no request line, no secret, no image signature.
        assert proxy.head[:1] == b"\x16"              # a TLS handshake record
        for clear in (b"PUT /services", b"tls-secret-42", b"XenSavedDomv2", b"xenops"):
            assert clear not in proxy.head
        assert summary["wire_bytes"] >= proxy.forwarded * 0.9
    finally:
        proxy.close()


def test_plain_sender_is_refused_by_a_tls_receiver(hosts, receiver, cert):
    a, b = hosts("A"), hosts("B")
    crt, key = cert
    r = receiver(b, "--tls-cert", str(crt), "--tls-key", str(key))
    a.shim("vm-create", "vm1", "--memory", "16M")
    out = a.shim("vm-migrate", "vm1", "--dest", r.address, check=False)
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr
    assert [v["state"] for v in a.vms()] == ["running"] and b.vms() == []
    assert "TLS handshake failed" in (b.root / "xenopsd.log").read_text()


def test_sender_refuses_a_receiver_it_does_not_trust(hosts, receiver, cert, tmp_path):
    a, b = hosts("A"), hosts("B")
    crt, key = cert
    r = receiver(b, "--tls-cert", str(crt), "--tls-key", str(key))
    other = tmp_path / "other"
    other.mkdir()
    other_crt, _ = self_signed(other, "someone-else")
    a.shim("vm-create", "vm1", "--memory", "16M")
    out = a.shim("vm-migrate", "vm1", "--dest", r.address, "--tls-ca", str(other_crt), check=False)
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "TLS handshake failed: CERTIFICATE_VERIFY_FAILED" in out.stderr
    assert [v["state"] for v in a.vms()] == ["running"] and b.vms() == []
