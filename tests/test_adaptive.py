"""Switching xenguest's in-band compression mid-save through emu-manager (our extension of the
control protocol and EMP), its per-pass reports, and how `auto` decides."""
from __future__ import annotations

import os
import time
from dataclasses import replace

import numpy as np
import pytest

from conftest import HostDir
from test_emu_manager import Xenopsd, append_only, transcript
from xenguest.adaptive import (HYSTERESIS, REGION_PFNS, REPROBE_EVERY, AdaptivePages, LinkMeter, Measurements,
                               compress_wins)
from xenmig import compressed, control, libxc

MB = 1e6


def restored_digests(a: HostDir, b: HostDir, stream, memory: str) -> list[str]:
    dst = b.empty("vm", memory)
    with open(stream, "rb") as f:
        b.run("xenguest", "-mode", "restore", "-domid", str(dst), "-fd", "0", stdin=f)
    return b.page_digests(dst)


def live_save(h: HostDir, stream, domid: int, before: list[str], after_pass=None,
              hold=lambda answers: False) -> tuple[Xenopsd, dict]:
    """A live save with -debuglog; the `before` lines go to emu-manager first. Answers and pass
    reports are collected; `after_pass(x, figures)` may send lines; `suspend:` is carried out
    (the domain paused) and acked only once `hold(answers)` is false."""
    fd = append_only(stream)
    x = Xenopsd(h, "-fd", str(fd), "-mode", "hvm_save", "-domid", str(domid), "-live", "true", "-dm", "qemu",
                "-debuglog", "true", stream_fd=fd)
    os.close(fd)
    for line in before:
        x.send(line)
    got: dict = {"iterations": [], "answers": [], "end": None}
    suspending = False
    while (line := x.recv()) is not None:
        if (answer := control.parse_compress_answer(line)) is not None:
            got["answers"].append(answer)
        elif (report := control.parse_iteration(line)) is not None:
            assert report[0] == "xenguest"
            got["iterations"].append(report[1])
            if after_pass is not None:
                after_pass(x, report[1])
        elif line == "suspend:":
            suspending = True
        elif line == "prepare:xenguest":
            x.send("done")
        elif not line.startswith("info:"):
            got["end"] = line
            break
        if suspending and not hold(got["answers"]):
            h.xenemu("pause", str(domid))          # as xenopsd does before its `done`
            x.send("done")
            suspending = False
    return x, got


def test_switch_on_then_off_mid_live_save_is_page_exact(hosts, tmp_path):
    a, b = hosts("A"), hosts("B")
    domid = a.create("vm", "32M", image="mixed", workload="increment")    # every pass resends pages
    stream = tmp_path / "stream"

    def switch_off(x: Xenopsd, figures: dict) -> None:
        if figures["iteration"] == 0:
            x.send(control.compress_request("xenguest", "off"))

    # the final pass (after `suspend:`) starts only once xenguest has taken the switch off
    x, got = live_save(a, stream, domid, [control.compress_request("xenguest", "on", 3)], switch_off,
                       hold=lambda answers: len(answers) < 2)
    assert got["end"] == "result:0 0", got
    code, err = x.finish()
    assert code == 0, err
    assert [(s.emu, s.mode, s.level, s.refused) for s in got["answers"]] == [
        ("xenguest", "on", 3, None), ("xenguest", "off", 3, None)]
    # queued before xenguest was initialised: sent right after the init stage, before migrate_live
    said = transcript(err)
    assert said[:3] == ["xenguest: migrate_init", "xenguest: xenmig_compress on 3", "xenguest: track_dirty"], said
    assert said.index("xenguest: migrate_live") < said.index("xenguest: xenmig_compress off") \
        < said.index("xenguest: migrate_paused"), said
    passes = got["iterations"]
    assert [p["iteration"] for p in passes] == list(range(len(passes))) and len(passes) >= 2, passes
    first, final = passes[0], passes[-1]
    assert first["mode"] == "on" and first["compressed_batches"] > 0 and first["levels"] == [3], first
    assert first["pages"] == 8192 and first["compress_mbps"] is not None, first
    assert final["mode"] == "off" and final["compressed_batches"] == 0 and final["levels"] == [], final
    assert final["plain_batches"] == -(-final["pages"] // 1024) and final["compress_mbps"] is None, final
    assert sum(p["plain_batches"] for p in passes[1:]) > 0, passes
    assert sum(p["wire_bytes"] for p in passes) < stream.stat().st_size
    assert a.domains()[0]["state"] == "paused"               # memory now is the pause point
    assert restored_digests(a, b, stream, "32M") == a.page_digests(domid)


def test_switches_before_the_save_are_answered_and_taken_in_order(hosts, tmp_path):
    """Switches that reach xenguest before migrate_live (adaptive's `auto` comes right after
    migrate_init) are answered at once, with the level each leaves in force, and the save's
    encoder takes them in order: `auto` after `on 3` keeps level 3 in force but no longer pins it."""
    a, b = hosts("A"), hosts("B")
    domid = a.create("vm", "32M", image="mixed")
    stream = tmp_path / "stream"
    x, got = live_save(a, stream, domid, [control.compress_request("xenguest", "on", 3),
                                          control.compress_request("xenguest", "auto")])
    assert got["end"] == "result:0 0", got
    code, err = x.finish()
    assert code == 0, err
    assert [(s.mode, s.level, s.refused) for s in got["answers"]] == [("on", 3, None), ("auto", 3, None)]
    said = transcript(err)
    assert said[:4] == ["xenguest: migrate_init", "xenguest: xenmig_compress on 3", "xenguest: xenmig_compress auto",
                        "xenguest: track_dirty"], said
    passes = got["iterations"]
    assert all(p["mode"] == "auto" for p in passes), passes
    assert restored_digests(a, b, stream, "32M") == a.page_digests(domid)


@pytest.mark.parametrize("mode", ["auto", "on"])
def test_random_memory_goes_plain_without_compressing_it(hosts, tmp_path, mode):
    """Memory that does not shrink, whether auto decides or every batch is to be compressed (on,
    as `-compress true`): every batch goes as plain PAGE_DATA, decided by a sample, so zstd never
    runs on a whole batch (no compression rate to report), and the pages arrive exactly."""
    a, b = hosts("A"), hosts("B")
    domid = a.create("vm", "32M", image="random")
    stream = tmp_path / "stream"
    x, got = live_save(a, stream, domid, [control.compress_request("xenguest", mode)])
    assert got["end"] == "result:0 0", got
    code, err = x.finish()
    assert code == 0, err
    assert [(s.mode, s.refused) for s in got["answers"]] == [(mode, None)]
    passes = got["iterations"]
    assert all(p["mode"] == mode and p["compress_mbps"] is None for p in passes), passes
    assert sum(p["compressed_batches"] for p in passes) == 0, passes
    assert passes[0]["plain_batches"] == 8, passes[0]             # 8192 pages, 1024 a batch
    assert restored_digests(a, b, stream, "32M") == a.page_digests(domid)


def test_refused_switches_answer_without_failing_the_save(hosts, tmp_path):
    """Unknown emulator, one without compression, a bad mode, and xenguest once it has completed:
    each answered `info:xenmig-compress-refused:`, and the save goes on."""
    h = hosts()
    from test_emu_manager import vgpu_vm
    domid = vgpu_vm(h)
    fds = [append_only(tmp_path / "stream"), append_only(tmp_path / "vgpu")]
    x = Xenopsd(h, "-fd", str(fds[0]), "-mode", "hvm_save", "-domid", str(domid), "-live", "false",
                "-dm", f"vgpu:{fds[1]}", stream_fd=fds[0], more_fds=(fds[1],))
    for fd in fds:
        os.close(fd)
    x.send("xenmig-compress:qemu on")
    x.send("xenmig-compress:xenguest fast")
    answers = []
    while (line := x.recv()) is not None:
        if (answer := control.parse_compress_answer(line)) is not None:
            answers.append(answer)
        elif line == "prepare:vgpu":          # xenguest has completed (non-live: one at a time)
            x.send("xenmig-compress:xenguest on")
            x.send("xenmig-compress:vgpu on")
            while len(answers) < 4:
                answers.append(control.parse_compress_answer(x.recv()))
            x.send("done")
        elif line in ("suspend:", "prepare:xenguest"):
            x.send("done")
        elif not line.startswith("info:"):
            break
    assert line == "result:0 0"
    code, err = x.finish()
    assert code == 0, err
    assert [(s.emu, s.refused) for s in answers] == [
        ("qemu", "no emulator qemu in this migration"),
        ("xenguest", "unknown compression mode 'fast' (one of off, on, auto)"),
        ("xenguest", "xenguest has completed its save"),
        ("vgpu", "vgpu has no in-band compression")], answers


# -- auto's decision from given measurements (the bench measures it on shaped links) ----------------
@pytest.mark.parametrize("link,compress,ratio,zero,wins", [
    (1500 * MB, 300 * MB, 2.6, 0.0, False),  # loopback: 2 threads turn out 600 MB/s, the link takes 1500
    (125 * MB, 300 * MB, 2.6, 0.0, True),    # 1 Gbit/s: 325 MB/s of guest memory compressed, 125 plain
    (125 * MB, 300 * MB, 1.02, 0.0, False),  # random memory does not shrink
    (None, 300 * MB, 2.6, 0.0, False),       # the link drains faster than 2 threads compress
    (None, 300 * MB, 2.6, 0.88, True),       # ... but an idle guest's batch is 88% zero pages: bits
    (125 * MB, 300 * MB, 1.02, 0.5, True),   # random data, half zero pages, over 1 Gbit/s
    (125 * MB, None, None, 0.0, False),      # nothing compressed yet
    (None, None, None, 0.6, True),           # nothing measured, but mostly zero pages
])
def test_auto_compresses_only_when_it_shortens_the_migration(link, compress, ratio, zero, wins):
    assert compress_wins(Measurements(link, compress, ratio, threads=2, zero=zero), compressing=False) is wins


def test_a_link_that_falls_shows_within_its_last_writes():
    """A second of writes to a fast link (never blocked), then two 4 MiB batches over 1 Gbit/s,
    blocked all along: the link figure is the slow link's at once, though the window's writes
    were mostly fast and unblocked."""
    meter, now = LinkMeter(), time.monotonic()
    for i in range(100):                                        # 1000 MB/s, the writer never waits
        meter.add(10_000_000, 0.0, now - 1.0 + i * 0.01)
    assert meter.rate() is None
    for i in range(2):
        meter.add(4 << 20, 0.034, now + 0.034 * (i + 1))
    assert meter.rate() == pytest.approx(2 * (4 << 20) / 0.068, rel=0.01)


def test_the_writer_compresses_a_plain_batch_whose_choice_changed_before_it_went():
    """Batches are encoded ahead of the writer. One encoded plain because the link did not bind
    (or the mode was off) is compressed when the writer comes to it, once the link binds (or the
    mode is on); one plain because its data does not shrink stays plain. The pass counts each
    batch once, as it went."""
    # 16 letters at random: it halves, at a rate (hundreds of MB/s) a link that does not bind beats
    letters = np.random.default_rng(15).integers(97, 113, (REGION_PFNS, 4096), dtype=np.uint8)
    noise = np.random.default_rng(16).integers(0, 256, (REGION_PFNS, 4096), dtype=np.uint8)
    rtype = lambda encoded: libxc.parse_record_header(encoded.buffers[0])[0]      # noqa: E731
    encoder = AdaptivePages("auto", level=1, threads=1)       # (at level -1, letters do not shrink)
    assert rtype(encoder.encode(batch(0), letters)) == compressed.REC_TYPE     # the first batch: a probe
    ahead = encoder.encode(batch(1), letters)
    assert rtype(ahead) == libxc.REC_TYPE_PAGE_DATA                 # no link figure: a fast link
    assert encoder.reconsider(batch(1), lambda: letters, ahead) is ahead           # nothing changed
    now = time.monotonic()
    encoder.link.add(4 << 20, 0.034, now - 0.034)
    encoder.link.add(4 << 20, 0.034, now)          # 1 Gbit/s, blocked all along: auto compresses
    assert rtype(encoder.encode(batch(2), noise)) == libxc.REC_TYPE_PAGE_DATA     # tried: it does not shrink
    noise_ahead = encoder.encode(batch(2), noise)   # its region is known now: plain
    went = [encoder.reconsider(batch(1), lambda: letters, ahead), encoder.reconsider(batch(2), lambda: noise, noise_ahead)]
    assert [rtype(e) for e in went] == [compressed.REC_TYPE, libxc.REC_TYPE_PAGE_DATA]
    assert went[1] is noise_ahead
    figures = encoder.end_pass()
    assert (figures["compressed_batches"], figures["plain_batches"]) == (2, 2), figures

    switched = AdaptivePages("off", level=1, threads=1)
    plain = switched.encode(batch(0), letters)
    switched.switch("on")
    assert rtype(switched.reconsider(batch(0), lambda: letters, plain)) == compressed.REC_TYPE
    figures = switched.end_pass()
    assert (figures["compressed_batches"], figures["plain_batches"]) == (1, 0), figures


def test_auto_stops_compressing_data_that_does_not_shrink():
    """Random memory over loopback: zstd outruns the link, so compressed costs no more time than
    plain, and the hysteresis alone would keep compressing every batch for nothing."""
    loopback = Measurements(link=600 * MB, compress=400 * MB, ratio=0.99, threads=2)
    assert compress_wins(loopback, compressing=True) is False
    assert compress_wins(replace(loopback, link=None), compressing=True) is False
    assert compress_wins(replace(loopback, zero=0.6), compressing=True) is True     # its zero pages go as bits


def test_auto_keeps_its_choice_within_the_hysteresis():
    # compressed exactly as fast as plain: neither switches on nor off
    even = Measurements(link=600 * MB, compress=300 * MB, ratio=2.6, threads=2)
    assert compress_wins(even, compressing=False) is False
    assert compress_wins(even, compressing=True) is True
    faster = Measurements(link=600 * MB * (1 - HYSTERESIS) ** 2, compress=300 * MB, ratio=2.6, threads=2)
    assert compress_wins(faster, compressing=False) is True


def batch(region: int) -> np.ndarray:
    return np.arange(region * REGION_PFNS, (region + 1) * REGION_PFNS, dtype=np.uint64)


def test_auto_leaves_regions_that_did_not_shrink_and_probes_them_again_now_and_then():
    """With a link that binds, a compressible region goes compressed and an incompressible one
    plain, compressed again (to see if it changed) at every REPROBE_EVERY-th visit."""
    encoder = AdaptivePages("auto", threads=1)
    encoder.link.add(4 << 20, 0.4, time.monotonic())        # 4 MiB in 0.4 s, all of it blocked: 10 MB/s
    noise = np.random.default_rng(14).integers(0, 256, (REGION_PFNS, 4096), dtype=np.uint8)
    text = np.tile(np.frombuffer(b"xenmig compresses this " * 178 + b"xx", dtype=np.uint8), (REGION_PFNS, 1))
    counts = {"noise": [0, 0], "text": [0, 0]}
    zstd_ran: list[int] = []                                 # the regions given whole to the compressor
    sampled: list[int] = []                                  # the regions whose sample was compressed
    codec_pack, codec_sample = encoder.codec.pack, encoder.codec.sample_says_plain
    encoder.codec.pack = lambda pfns, pages, level, zero, data=None: \
        zstd_ran.append(int(pfns[0]) // REGION_PFNS) or codec_pack(pfns, pages, level, zero, data)
    encoder.codec.sample_says_plain = lambda pages, zero, level, data=None: sampled.append(int(pages is noise)) or \
        codec_sample(pages, zero, level, data)
    for visit in range(2 * REPROBE_EVERY + 1):
        for region, (kind, pages) in enumerate((("text", text), ("noise", noise))):
            rtype = int.from_bytes(bytes(encoder.encode(batch(region), pages).buffers[0][:4]), "little")
            counts[kind][rtype == compressed.REC_TYPE] += 1
    figures = encoder.end_pass()
    assert counts["text"] == [0, 2 * REPROBE_EVERY + 1], counts
    assert counts["noise"] == [2 * REPROBE_EVERY + 1, 0], counts        # it never shrank: sent plain
    assert figures["compressed_batches"] == 2 * REPROBE_EVERY + 1, figures
    assert figures["plain_batches"] == 2 * REPROBE_EVERY + 1, figures
    # the noise region was sampled at its first visit and at its reprobes only (3 of 17 visits),
    # and each time its sample said plain: zstd never ran on the whole of it
    assert sampled.count(1) == 3 and zstd_ran.count(1) == 0, (sampled, zstd_ran)
    assert zstd_ran.count(0) == 2 * REPROBE_EVERY + 1, zstd_ran
    assert figures["compress_mbps"] is not None, figures             # measured on the text batches alone


def test_auto_caches_pages_only_while_compressing_pays():
    """A delta only shrinks the wire: over a link that does not bind, auto copies no page into its
    delta cache; over one that binds, the batches it compresses are kept there (bases for deltas)."""
    # 16 letters at random: it halves, at a rate (hundreds of MB/s) a link that does not bind beats
    letters = np.random.default_rng(15).integers(97, 113, (REGION_PFNS, 4096), dtype=np.uint8)
    held = {}
    for link, (nbytes, blocked) in {"fast": (64 << 20, 0.0), "slow": (4 << 20, 0.4)}.items():
        encoder = AdaptivePages("auto", threads=1, delta_cache=8 << 20)
        encoder.start_pass(0, 4 * REGION_PFNS)
        now = time.monotonic()
        encoder.link.add(nbytes // 2, blocked / 2, now - 0.4)    # fast: 64 MiB in 0.4 s, never blocked
        encoder.link.add(nbytes // 2, blocked / 2, now)          # slow: 10 MB/s, blocked all along
        for region in range(4):
            encoder.encode(batch(region), letters)
        held[link] = encoder.cache.held() - encoder.cache.overhead
    assert held["fast"] == 0, held
    assert held["slow"] >= REGION_PFNS * 4096, held


def test_a_sample_sends_noise_plain_and_what_shrinks_compressed():
    """The encoder's rule (plain PAGE_DATA when the record would not be shorter), predicted from a
    sample: noise goes plain; noise with zero pages, or with a quarter of text pages, shrinks."""
    codec = compressed.CompressedPages(threads=1)
    noise = np.random.default_rng(15).integers(0, 256, (REGION_PFNS, 4096), dtype=np.uint8)
    half_zero, quarter_text = noise.copy(), noise.copy()
    half_zero[::2] = 0
    quarter_text[::4] = np.frombuffer(b"xenmig compresses this " * 178 + b"xx", dtype=np.uint8)

    def rtype(pages: np.ndarray) -> int:
        return int.from_bytes(bytes(codec.encode(batch(0), pages).buffers[0][:4]), "little")

    assert codec.sample_says_plain(noise, compressed.zero_pages(noise), codec.level)
    assert rtype(noise) == libxc.REC_TYPE_PAGE_DATA
    assert rtype(half_zero) == compressed.REC_TYPE
    assert rtype(quarter_text) == compressed.REC_TYPE


def test_switch_applies_from_the_next_batch_and_a_level_pins_auto_until_the_next_switch():
    encoder = AdaptivePages("off", threads=1)
    pages = np.zeros((REGION_PFNS, 4096), dtype=np.uint8)
    assert encoder.switch("on", 5) == 5
    encoder.encode(batch(0), pages)
    assert encoder.switch("auto", 3) == 3
    assert encoder.switch("off") == 3
    encoder.encode(batch(1), pages)
    figures = encoder.end_pass()
    assert (figures["compressed_batches"], figures["plain_batches"], figures["levels"], figures["mode"]) == \
        (1, 1, [5], "off"), figures
