"""Delta encoding in whole migrations: negotiated with the destination, bounded by xenopsd.conf's
migration-delta-cache, forwarded by emu-manager to xenguest, reported in `vm-migrate --json`.

Real processes throughout: xenopsd-shim on both sides, emu-manager, xenguest. The guest keeps
writing during the migration (`increment`: one byte of every page in turn, so each re-sent page
differs from its base in one byte; `dirty`: realistic rewrites), and each migration is checked
page by page (--verify, then the destination's page digests against the source's at the end).
"""
from __future__ import annotations

import json

import pytest

from conftest import HostDir

MIB = 1 << 20


def configure(host: HostDir, method: str = "xenguest", extra: str = "", threads: int = 0) -> None:
    (host.root / "xenopsd.conf").write_text(f"migration-compressor = {method}\n{extra}")
    host.env["XENGUEST_COMPRESS_THREADS"] = str(threads)
    # Pre-copy runs to iteration 2, so passes after the first re-send pages (deltas may go).
    host.env["EMU_MANAGER_LIVE_ITERATIONS"] = "2"


def migrate(src: HostDir, dest: str, *extra: str, check: bool = True):
    out = src.shim("vm-migrate", "vm1", "--dest", dest, "--compress", "--live", "--verify", "--json", *extra,
                   check=check)
    assert "Traceback" not in out.stderr, out.stderr
    return out


def delta_args(summary: dict) -> list[str]:
    argv = summary["emu_manager_argv"]
    return argv[argv.index("-delta-cache"):][:2] if "-delta-cache" in argv else []


def later_passes(summary: dict) -> list[dict]:
    return summary["iteration_stats"][1:]


@pytest.mark.parametrize("method,threads", [("xenguest", 1), ("xenguest", 4), ("adaptive", 0)])
def test_increment_guest_migrates_with_deltas_page_exact(hosts, receiver, method, threads):
    """One byte changed per page: re-sent pages go as deltas, the memory arrives exactly, and the
    summary accounts for it (per pass, and in its `delta` object)."""
    a, b = hosts("A"), hosts("B")
    configure(a, method, threads=threads)
    r = receiver(b)
    a.shim("vm-create", "vm1", "--memory", "32M", "--image", "mixed", "--workload", "increment:100MB/s")
    # auto keeps its cache only where compressing pays: a link that binds
    link = ["--max-bandwidth", "40MB/s"] if method == "adaptive" else []
    summary = json.loads(migrate(a, r.address, *link).stdout)
    assert summary["status"] == "success" and summary["verified"] and summary["method"] == method
    assert delta_args(summary) == ["-delta-cache", str(32 * MIB)]     # the 64M default, capped at the VM
    delta = summary["delta"]
    assert delta["cache_bound_bytes"] == 32 * MIB
    assert delta["reason"] == "re-sent pages may go as deltas from a cache of up to 32 MiB"
    first = summary["iteration_stats"][0]
    assert first["delta_pages"] == 0, first                             # never in iteration 0
    assert delta["delta_pages"] > 0 and delta["cache_hits"] >= delta["delta_pages"], summary
    assert delta["delta_pages"] == sum(p["delta_pages"] for p in later_passes(summary))
    assert 0 < delta["cache_peak_bytes"] <= 32 * MIB
    assert all(p["cache_bytes"] <= p["cache_peak_bytes"] <= 32 * MIB for p in summary["iteration_stats"])
    assert [v["state"] for v in b.vms()] == ["running"] and a.vms() == []
    assert "delta encoding on: re-sent pages may go as deltas" in (a.root / "xenopsd.log").read_text()


def test_dirty_guest_with_a_small_cache_stays_within_its_bound(hosts, receiver):
    """A 1 MiB cache for a 64 MiB guest that rewrites pages at random: the cache never holds more
    than its bound (xenguest's own figures, pass by pass), and the memory arrives exactly."""
    a, b = hosts("A"), hosts("B")
    configure(a, extra="migration-delta-cache = 1M\n")
    r = receiver(b)
    a.shim("vm-create", "vm1", "--memory", "64M", "--image", "busy", "--workload", "dirty:100MB/s")
    summary = json.loads(migrate(a, r.address).stdout)
    assert summary["verified"] and delta_args(summary) == ["-delta-cache", str(MIB)]
    assert summary["delta"]["cache_bound_bytes"] == MIB
    assert summary["delta"]["cache_peak_bytes"] <= MIB
    assert all(p["cache_peak_bytes"] <= MIB for p in summary["iteration_stats"]), summary["iteration_stats"]
    assert [v["state"] for v in b.vms()] == ["running"]


@pytest.mark.parametrize("how", ["option", "config"])
def test_a_destination_without_deltas_gets_none(hosts, receiver, how):
    """An older destination (in-band records, but no DELTA_PAGE_DATA in its features) is sent no
    delta record: xenguest runs without a cache, the summary says why, and nothing is refused."""
    a, b = hosts("A"), hosts("B")
    configure(a)
    if how == "config":
        (b.root / "xenopsd.conf").write_text("migration-accept-delta = false\n")
        r = receiver(b)
    else:
        r = receiver(b, "--no-delta")
    a.shim("vm-create", "vm1", "--memory", "32M", "--image", "mixed", "--workload", "increment:100MB/s")
    out = migrate(a, r.address)
    summary = json.loads(out.stdout)
    assert out.stderr == ""                       # not a fallback of the method: no warning
    assert summary["method"] == "xenguest" and summary["verified"]
    assert delta_args(summary) == [] and summary["delta"]["cache_bound_bytes"] == 0
    assert summary["delta"]["reason"] == "the destination does not accept delta records (DELTA_PAGE_DATA)"
    assert all(p["delta_pages"] == 0 and p["cache_peak_bytes"] == 0 for p in summary["iteration_stats"])
    features = json.loads(_features(r.address))
    assert 20 not in features["record_types"] and "xor-zstd" not in features["in_band_algorithms"]
    assert 19 in features["record_types"] and "zstd" in features["in_band_algorithms"]


def _features(address: str) -> str:
    from xenopsd_shim import transport
    from xenopsd_shim.timeouts import Timeouts
    body = transport.query_features(address, {transport.COOKIE_DBG: "test"}, Timeouts(), None)
    assert body is not None
    return body.decode()


def test_a_zero_cache_turns_deltas_off(hosts, receiver):
    a, b = hosts("A"), hosts("B")
    configure(a, extra="migration-delta-cache = 0\n")
    r = receiver(b)
    a.shim("vm-create", "vm1", "--memory", "32M", "--image", "mixed", "--workload", "increment:100MB/s")
    summary = json.loads(migrate(a, r.address).stdout)
    assert summary["verified"] and delta_args(summary) == []
    assert summary["delta"] == {"cache_bound_bytes": 0, "reason": "migration-delta-cache is 0",
                                "cache_peak_bytes": 0, "delta_pages": 0, "cache_hits": 0, "cache_misses": 0,
                                "delta_saved_bytes": 0}


@pytest.mark.parametrize("value", ["lots", "-1M", "1X"])
def test_a_bad_cache_size_is_one_line_and_the_vm_stays(hosts, value):
    a = hosts("A")
    configure(a, extra=f"migration-delta-cache = {value}\n")
    a.shim("vm-create", "vm1", "--memory", "16M")
    out = a.shim("vm-migrate", "vm1", "--dest", "127.0.0.1:9", "--compress", check=False)
    assert out.returncode != 0 and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "migration-delta-cache must be a size such as 64M, or 0 to turn deltas off" in out.stderr
    assert [v["state"] for v in a.vms()] == ["running"]


def test_stream_and_none_send_no_deltas(hosts, receiver):
    a, b = hosts("A"), hosts("B")
    configure(a, "stream")
    r = receiver(b)
    a.shim("vm-create", "vm1", "--memory", "16M", "--image", "mixed", "--workload", "increment:50MB/s")
    summary = json.loads(migrate(a, r.address).stdout)
    assert summary["delta"]["cache_bound_bytes"] == 0 and delta_args(summary) == []
    assert summary["delta"]["reason"] == "stream sends no in-band records"


@pytest.mark.slow
def test_back_and_forth_with_deltas_many_runs(hosts, receiver):
    """The same writing VM migrated back and forth eight times with deltas, four encode threads:
    page-exact every time, the cache within its bound every time, and delta pages sent every time.
    The cache holds the VM, so every page re-sent has its base: with a quarter of it (8M), whether
    the `increment` cursor came back to a cached page within a run was chance (0 delta pages in
    one run of eight, 1800-3800 in the others). A cache smaller than what it serves is
    test_dirty_guest_with_a_small_cache_stays_within_its_bound's case."""
    a, b = hosts("A"), hosts("B")
    for h in (a, b):
        configure(h, extra="migration-delta-cache = 32M\n", threads=4)
    serves = {a: receiver(a), b: receiver(b)}
    a.shim("vm-create", "vm1", "--memory", "32M", "--image", "busy", "--workload", "increment:100MB/s")
    src, dst = a, b
    runs: list[int] = []
    for _ in range(8):
        before_vms = src.vms()
        assert [v["state"] for v in before_vms] == ["running"]
        summary = json.loads(migrate(src, serves[dst].address).stdout)
        assert summary["verified"] and summary["delta"]["cache_peak_bytes"] <= 32 * MIB
        runs.append(sum(p["delta_pages"] for p in later_passes(summary)))
        assert runs[-1] > 0, summary["iteration_stats"]         # this run really sent deltas
        assert [v["state"] for v in dst.vms()] == ["running"] and src.vms() == []
        src, dst = dst, src
    print(f"\ndelta pages per run: {runs}")
