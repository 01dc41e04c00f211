"""`make bench`: which compression method wins where, measured side by side in one run.

Every migration is a real one between two emulated hosts (the executables
as users run them). Methods are interleaved within each repetition so a
noisy machine hurts them alike; the report gives medians. Links are shaped
for real (two network namespaces joined by a veth pair, `tc tbf` on it) when
running as root, else by the shim's --max-bandwidth (kernel socket pacing);
the report says which. Reference points (zstd CLI alone, zstd | zstd -d,
a plain socket copy) are timed on the very memory bytes the VMs start with.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from harness import netns
from harness.netns import NetnsLink, sh
from xenopsd_shim.phases import PHASES

BIN = Path(sys.executable).parent
OUT = Path(__file__).resolve().parent
LINKS = {"unlimited": None, "10gbit": 10_000_000_000, "1gbit": 1_000_000_000}     # bits/s
METHODS = ("none", "stream", "xenguest", "adaptive")
# A method's xenopsd.conf on the source: its compressor, and for the in-band ones without deltas
# (issue 15's "without" rows) a zero cache; the plain names run with the default cache.
NO_DELTA = "-nodelta"
DELTA_OFF = "migration-delta-cache = 0\n"


# Links ------------------------------------------------------------------------------
class Link:
    """Where the receiver listens and how a given rate is imposed."""
    kind = "max-bandwidth (kernel socket pacing in the shim)"

    def __init__(self) -> None:
        self.dest_host = "127.0.0.1"

    def prefix(self, side: str) -> list[str]:
        return []

    def shape(self, bits: int | None) -> list[str]:
        """Extra vm-migrate arguments for this rate (none when tc does it)."""
        return [] if bits is None else ["--max-bandwidth", f"{bits // 8}"]

    def close(self) -> None:
        pass


def make_link(force_pacing: bool) -> Link:
    if not force_pacing and netns.unavailable() is None:
        try:
            return NetnsLink("xmb")     # type: ignore[return-value]   (the same interface as Link)
        except subprocess.CalledProcessError as e:
            print(f"network namespaces unavailable ({e.stderr.strip()}); using socket pacing", file=sys.stderr)
    return Link()


# Hosts --------------------------------------------------------------------------------
@dataclass
class Bench:
    link: Link
    root_a: Path
    root_b: Path
    dest: str
    env: dict[str, str]

    def shim(self, side: str, *argv: str, check: bool = True) -> subprocess.CompletedProcess:
        root = self.root_a if side == "A" else self.root_b
        return sh(*self.link.prefix(side), str(BIN / "xenopsd-shim"), "--root", str(root), *argv, check=check,
                  env=self.env)


@contextmanager
def hosts(link: Link) -> Iterator[Bench]:
    work = Path(tempfile.mkdtemp(prefix="xenmig-bench-"))
    env = {**os.environ, "PATH": f"{BIN}:{os.environ.get('PATH', '')}"}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    bench = Bench(link, work / "A", work / "B", f"{link.dest_host}:{port}", env)
    bench.root_a.mkdir()
    receiver = subprocess.Popen([*link.prefix("B"), str(BIN / "xenopsd-shim"), "--root", str(bench.root_b),
                                 "serve", "--listen", bench.dest], env=env, stderr=subprocess.PIPE, text=True)
    assert receiver.stderr is not None
    receiver.stderr.readline()          # "listening on ..."
    threading.Thread(target=receiver.stderr.read, daemon=True).start()
    try:
        yield bench
    finally:
        receiver.terminate()
        receiver.wait(timeout=60)
        for side in ("A", "B"):
            for vm in json.loads(bench.shim(side, "vm-list", "--json", check=False).stdout or "[]"):
                bench.shim(side, "vm-destroy", vm["uuid"], check=False)
        shutil.rmtree(work, ignore_errors=True)


# Reference points -------------------------------------------------------------------------
def _mbps(nbytes: int, seconds: float) -> float:
    return round(nbytes / seconds / 1e6, 1)


def references(memory: Path) -> dict[str, float]:
    """MB/s of guest memory for the limits a method can approach, on the same bytes."""
    size = memory.stat().st_size
    out: dict[str, float] = {}
    t = time.monotonic()
    compressed = sh("/usr/bin/zstd", "--fast", "-c", str(memory), check=True, text=False).stdout
    out["zstd --fast CLI"] = _mbps(size, time.monotonic() - t)
    out["zstd --fast ratio"] = round(size / len(compressed), 3)
    t = time.monotonic()
    subprocess.run(f"/usr/bin/zstd --fast -c {memory} | /usr/bin/zstd -d -c > /dev/null", shell=True, check=True)
    out["zstd --fast, piped to zstd -d"] = _mbps(size, time.monotonic() - t)
    srv = socket.create_server(("127.0.0.1", 0))

    def sink() -> None:
        conn, _ = srv.accept()
        with conn:
            buf = bytearray(1 << 20)
            while conn.recv_into(buf):
                pass
    th = threading.Thread(target=sink)
    th.start()
    t = time.monotonic()
    with socket.create_connection(srv.getsockname()) as c, open(memory, "rb") as f:
        c.sendfile(f)
    th.join()
    srv.close()
    out["plain socket copy"] = _mbps(size, time.monotonic() - t)
    out["in-band codec alone, CPU"] = codec_alone(memory)
    return out


def codec_alone(memory: Path) -> float:
    """MB/s of guest memory per CPU second of the in-band codec's own work on these bytes, one
    thread, nothing else: encode each 1024-page batch as xenguest does (zero test, snapshot, zstd
    at its level) and inflate it again. A migration's CPU cannot fall below a plain migration's plus
    this, whatever the code around the codec does: the floor under the in-band CPU targets."""
    import numpy as np

    from xenmig import compressed

    pages = np.memmap(memory, dtype=np.uint8, mode="r").reshape(-1, compressed.PAGE_SIZE)
    encoder, batch = compressed.CompressedPages(), compressed.libxc.PAGE_DATA_MAX_PFNS
    t = time.thread_time()
    for start in range(0, len(pages), batch):
        pfns = np.arange(start, min(start + batch, len(pages)), dtype=np.uint64)
        header, *body = encoder.encode(pfns, pages[start:start + batch]).buffers
        if struct.unpack_from("<I", header)[0] == compressed.REC_TYPE:     # else it went plain
            _, zero, payload = compressed.parse(memoryview(b"".join(body[:2])), len(pages))
            if not zero.all():
                compressed.inflate(payload, compressed.PAGE_SIZE * int((~zero).sum()))
    return _mbps(pages.nbytes, time.thread_time() - t)


# Runs ----------------------------------------------------------------------------------------
PROFILES = ("idle", "mixed", "busy", "random")       # busy: no zero page left, every page compressed
WORKLOADS = ("none", "dirty:50MB/s")
# A second size, so the targets that name both 256 MiB and 1 GiB come from one run.
SPOT = {"profile": "mixed", "workload": "none", "link": "unlimited"}
SPOT_SIZE = {True: "1G", False: "256M"}              # by --quick


@dataclass(frozen=True)
class Case:
    size: str
    profile: str
    workload: str
    link: str
    # Issue 14's scenarios beyond the grid (None: a grid case, every method).
    scenario: str | None = None
    drop_after: float | None = None     # seconds after vm-migrate starts: the link falls to 1 Gbit/s
    vms: int = 1                        # more than one: the host is evacuated, all at once
    methods: tuple[str, ...] = METHODS
    conf: str = ""                      # more of the source's xenopsd.conf (its method's own lines win)


DROP = "unlimited, then 1gbit"
IN_BAND = ("none", "xenguest", "adaptive")      # what adaptive must beat: plain, and compressing always
# A link that falls half-way through a 1 GiB migration (none sends about half by then); a guest
# that dirties faster than 1 Gbit/s carries; four VMs evacuated together over 1 Gbit/s.
SCENARIOS = (
    Case("1G", "mixed", "none", DROP, "link drop", drop_after=0.8, methods=IN_BAND),
    Case("256M", "mixed", "dirty:160MB/s", "1gbit", "dirty faster than the link", methods=IN_BAND),
    Case("256M", "mixed", "none", "1gbit", "evacuate 4 VMs", vms=4, methods=IN_BAND),
    # Issue 15: one byte per page per pass (QEMU's test guest), and realistic rewrites, with and
    # without deltas.
    # The increment guest's working set is all of its memory: the cache is sized to it (with the
    # 64 MiB default a quarter of the pages could hit, and a cursor sweeping memory hits none).
    Case("256M", "mixed", "increment", "1gbit", "increment, deltas", methods=("xenguest" + NO_DELTA, "xenguest"),
         conf="migration-delta-cache = 256M\n"),
    Case("256M", "mixed", "dirty:50MB/s", "1gbit", "dirty, deltas", methods=("adaptive" + NO_DELTA, "adaptive")),
)


def cases(size: str, spot_size: str | None, quick: bool) -> list[Case]:
    """Every case of one repetition; all links and sizes fall in each, so a slow window of
    the machine hurts every link alike instead of one."""
    out = [Case(size, p, w, link) for p in PROFILES for w in WORKLOADS for link in LINKS
           if not (quick and w != "none" and (p != "mixed" or link != "unlimited"))]
    if spot_size and spot_size != size:
        out.append(Case(spot_size, **SPOT))
    return out + list(SCENARIOS)


def source_conf(method: str) -> str:
    compressor = method.removesuffix(NO_DELTA)
    return f"migration-compressor = {'stream' if compressor == 'none' else compressor}\n" \
        + (DELTA_OFF if method.endswith(NO_DELTA) else "")


def migrate_once(b: Bench, case: Case, method: str) -> dict:
    (b.root_a / "xenopsd.conf").write_text(case.conf + source_conf(method))
    names = [f"vm{i}" for i in range(case.vms)]
    for name in names:
        b.shim("A", "vm-create", name, "--memory", case.size, "--image", case.profile, "--workload", case.workload)
    if case.workload != "none":
        time.sleep(0.5)
    flag = "--no-compress" if method == "none" else "--compress"
    link_args = b.link.shape(LINKS[case.link.split(",")[0]])
    drop = None
    if case.drop_after is not None:
        drop = threading.Timer(case.drop_after, b.link.shape, [LINKS["1gbit"]])
        drop.start()
    try:
        if case.vms > 1:
            proc = b.shim("A", "host-evacuate", "--dest", b.dest, "--parallel", str(case.vms), "--json",
                          *link_args, flag, check=False)
        else:
            proc = b.shim("A", "vm-migrate", names[0], "--dest", b.dest, "--json", *link_args, flag, check=False)
    finally:
        if drop is not None:
            drop.cancel()
            drop.join()
    if proc.returncode != 0:
        for name in names:
            b.shim("A", "vm-destroy", name, check=False)
        raise RuntimeError(f"{method} {case}: {proc.stderr.strip()}")
    for name in names:
        b.shim("B", "vm-destroy", name)
    summary = json.loads(proc.stdout)
    return evacuation_run(summary) if case.vms > 1 else summary


def evacuation_run(evacuation: dict) -> dict:
    """An evacuation as one run: its aggregate time, its VMs' bytes and CPU summed, the longest
    downtime, the most passes."""
    vms = evacuation["vms"]
    cpu: dict[str, dict[str, float]] = {}
    for vm in vms:
        for side, roles in vm["cpu_seconds"].items():
            for role, seconds in roles.items():
                cpu.setdefault(side, {})[role] = cpu.get(side, {}).get(role, 0.0) + seconds
    return {"total_seconds": evacuation["total_seconds"], "cpu_seconds": cpu,
            "downtime_seconds": max(vm["downtime_seconds"] for vm in vms),
            "wire_bytes": sum(vm["wire_bytes"] for vm in vms), "memory_bytes": sum(vm["memory_bytes"] for vm in vms),
            "iterations": max(vm["iterations"] for vm in vms), "iteration_stats": []}


def _role_cpu(run: dict, role: str) -> float:
    return sum(side.get(role, 0.0) for side in run["cpu_seconds"].values())


def summarise(runs: list[dict]) -> dict[str, Any]:
    med = lambda xs: round(statistics.median(xs), 3) if xs else None  # noqa: E731
    roles = sorted({role for r in runs for side in r["cpu_seconds"].values() for role in side})
    cpu = {role: med([_role_cpu(r, role) for r in runs]) for role in roles}
    traced = [r["phases"] for r in runs if r.get("phases")]
    phases = {name: med([p[name] for p in traced]) for name in PHASES} if traced else None
    return {
        "runs": len(runs),
        "total_seconds": med([r["total_seconds"] for r in runs]),
        "downtime_seconds": med([r["downtime_seconds"] for r in runs]),
        "wire_bytes": int(statistics.median([r["wire_bytes"] for r in runs])),
        "ratio": med([r["memory_bytes"] / r["wire_bytes"] for r in runs]),
        "guest_mbps": med([r["memory_bytes"] / r["total_seconds"] / 1e6 for r in runs]),
        "cpu_seconds": cpu, "cpu_total": round(sum(v for v in cpu.values() if v), 3),
        "phases": phases,
        "fixed_seconds": med([p["start_up"] + p["tail"] for p in traced]),
        "iterations": med([r["iterations"] for r in runs]),
        # The pages of the pass made while paused: what pre-copy left (adaptive's convergence).
        "final_pass_pages": med([r["iteration_stats"][-1]["pages"] for r in runs if r.get("iteration_stats")]),
        # What the passes after the first put on the wire (deltas' domain), and the delta cache's peak.
        "later_wire_bytes": med([sum(p["wire_bytes"] for p in r["iteration_stats"][1:]) for r in runs
                                 if r.get("iteration_stats")]),
        "delta_pages": med([r["delta"]["delta_pages"] for r in runs if r.get("delta")]),
        "cache_peak_bytes": med([r["delta"]["cache_peak_bytes"] for r in runs if r.get("delta")]),
        "data_mbps": med([r["memory_bytes"] / r["phases"]["data"] / 1e6 for r in runs
                          if r.get("phases") and r["phases"]["data"] > 0]),
    }


def canary(runs: list[dict]) -> dict[str, float]:
    """The same fixed work in every case, so it moves only with the machine: emu-manager's CPU
    (all start-up; it only relays) and the start-up phase's wall time, which also shows a window
    where other work took the CPUs (CPU seconds do not: they count only what ran)."""
    secs = sorted(_role_cpu(r, "emu-manager") for r in runs)
    start_up = [r["phases"]["start_up"] for r in runs if r.get("phases")]
    return {"emu_manager_cpu_median": round(statistics.median(secs), 3), "min": secs[0], "max": secs[-1],
            "start_up_median": round(statistics.median(start_up), 3) if start_up else None}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="256 MiB VMs, fewer cases, a 1 GiB point (minutes)")
    ap.add_argument("--size", default=None)
    ap.add_argument("--spot-size", default=None,
                    help="the second size's point (mixed, idle guest, unlimited); '' for none")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--pacing", action="store_true", help="shape links with --max-bandwidth even as root")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    size = args.size or ("256M" if args.quick else "1G")
    spot_size = SPOT_SIZE[args.quick] if args.spot_size is None else args.spot_size or None
    reps = args.reps or (3 if args.quick else 5)
    link = make_link(args.pacing)
    # A link that changes mid-run needs tc: socket pacing is fixed when the connection is made.
    plan = [c for c in cases(size, spot_size, args.quick) if c.drop_after is None or isinstance(link, NetnsLink)]
    runs: dict[tuple[Case, str], list[dict]] = {(c, m): [] for c in plan for m in c.methods}
    ref_runs: dict[tuple[str, str], list[dict[str, float]]] = {}
    canaries: list[dict] = []
    started = time.monotonic()
    try:
        with hosts(link) as b:
            memories: dict[tuple[str, str], Path] = {}
            for key in dict.fromkeys([(size, p) for p in PROFILES] + [(c.size, c.profile) for c in plan]):
                # The references' bytes: a VM's initial memory, kept as a file (an evacuation
                # would take a VM along).
                name = f"ref-{key[1]}-{key[0]}"
                b.shim("A", "vm-create", name, "--memory", key[0], "--image", key[1])
                domid = next(d["domid"] for d in json.loads(b.shim("A", "vm-list", "--json").stdout)
                             if d["name"] == name)
                memories[key] = b.root_a.parent / f"{name}.memory"
                shutil.copyfile(b.root_a / "domains" / str(domid) / "memory", memories[key])
                b.shim("A", "vm-destroy", name)
            for rep in range(reps):
                rep_runs: list[dict] = []
                for key, memory in memories.items():    # the reference points share the window too
                    ref_runs.setdefault(key, []).append(references(memory))
                for case in plan:
                    methods = case.methods
                    order = methods[rep % len(methods):] + methods[:rep % len(methods)]   # no method always first
                    for method in order:
                        run = migrate_once(b, case, method)
                        runs[(case, method)].append(run)
                        if case.scenario is None:       # the canary: the same work in every repetition
                            rep_runs.append(run)
                link.shape(None)
                canaries.append({"rep": rep + 1, **canary(rep_runs),
                                 "zstd_cli_mixed_seconds": round(memories[(size, "mixed")].stat().st_size / 1e6
                                                                 / ref_runs[(size, "mixed")][-1]["zstd --fast CLI"], 3),
                                 "elapsed": round(time.monotonic() - started, 1)})
                c = canaries[-1]
                print(f"repetition {rep + 1}/{reps}: canary emu-manager CPU {c['emu_manager_cpu_median']:.2f} s "
                      f"(median of {len(rep_runs)} migrations, {c['min']:.2f}-{c['max']:.2f}), start-up "
                      f"{c['start_up_median'] or 0:.2f} s, zstd --fast CLI {c['zstd_cli_mixed_seconds']:.2f} s on "
                      f"{size} mixed; "
                      f"{c['elapsed']:.0f} s so far", flush=True)
    finally:
        link.close()
    results = [{"size": c.size, "profile": c.profile, "workload": c.workload, "link": c.link, "method": m,
                **({"scenario": c.scenario} if c.scenario else {}), **summarise(runs[(c, m)])}
               for c in plan for m in c.methods]
    refs = {f"{p}" if s == size else f"{p} {s}": {k: round(statistics.median(r[k] for r in rs), 3) for k in rs[0]}
            for (s, p), rs in ref_runs.items()}
    report = {"size": size, "spot_size": spot_size, "reps": reps, "link_shaping": link.kind,
              "cpus": os.cpu_count(), "links": LINKS, "seconds": round(time.monotonic() - started, 1), "canary": canaries,
              "references": refs, "results": results}
    args.out.mkdir(parents=True, exist_ok=True)
    from .report import write_markdown, write_plot

    previous_path = args.out / "results.json"
    previous = json.loads(previous_path.read_text()) if previous_path.exists() else None
    if previous is not None:
        (args.out / "results-previous.json").write_text(json.dumps(previous, indent=1))
    previous_path.write_text(json.dumps(report, indent=1))
    write_markdown(report, args.out / "results.md", previous)
    write_plot(report, args.out / "migration-time.png")
    print((args.out / "results.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
