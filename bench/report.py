"""The benchmark's report: the issue's targets as ratios from this run (beside the previous
run's), a table per link, the phase breakdown, the canary per repetition, a plot."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

Row = dict[str, Any]
Report = dict[str, Any]
Target = tuple[str, str, bool | None]          # (target, figure, met?); met None: no data in the run
NO_DATA = "no data"
SMALL, LARGE = "256M", "1G"                     # the sizes the targets name
IDLE_GUEST = dict(profile="mixed", workload="none")
# Nothing gets slower: this run against the previous one, case by case. A shared 2-CPU machine
# moves single cases by 10-20%, so the whole must not be slower (geometric mean) and no case beyond
# the noise.
SLOWER_MEAN, SLOWER_WORST = 1.0, 1.25
_UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def _label(size: str) -> str:
    """256M -> 256 MiB, as the issue names the sizes."""
    return f"{size[:-1]} {size[-1].upper()}iB" if size[-1].upper() in _UNITS else f"{size} B"


def _bytes(size: str) -> int:
    return int(size[:-1]) * _UNITS[size[-1].upper()] if size[-1].upper() in _UNITS else int(size)


def _find(report: Report, **match: str | None) -> Row | None:
    """The row of this case; rows of a report older than the size column are its main size, and
    a row without a scenario is the grid's."""
    match.setdefault("scenario", None)
    return next((r for r in report["results"]
                 if all(r.get(k, report["size"] if k == "size" else None) == v for k, v in match.items())), None)


def _case(report: Report, r: Row) -> dict[str, str | None]:
    """What identifies a row's case across runs."""
    return {"size": r.get("size", report["size"]), **{k: r[k] for k in ("profile", "workload", "link", "method")},
            "scenario": r.get("scenario")}


def _cli_mbps(report: Report, size: str, profile: str) -> float | None:
    """The zstd --fast CLI alone on the same bytes (MB/s of guest memory)."""
    refs = report["references"].get(profile if size == report["size"] else f"{profile} {size}", {})
    return refs.get("zstd --fast CLI")


def _ratio(name: str, limit: float, a: float | None, b: float | None, at_least: bool = False) -> Target:
    """a / b against the limit (at most, or at least)."""
    if not a or not b:
        return name, NO_DATA, None
    value = a / b
    return name, f"{value:.2f}x ({a:.3g} / {b:.3g})", value >= limit if at_least else value <= limit


def _each_method(name: str, limit: float, rows: list[Row | None], key: str) -> Target:
    """A limit every method must keep: the worst one decides."""
    values = {r["method"]: r[key] for r in rows if r is not None and r.get(key) is not None}
    if not values:
        return name, NO_DATA, None
    return name, ", ".join(f"{m} {v:.3f} s" for m, v in values.items()), max(values.values()) <= limit


def _get(row: Row | None, key: str) -> float | None:
    return row.get(key) if row else None


def _against_cli(report: Report, r: Row) -> float | None:
    """The row's time in units of the same run's zstd --fast CLI time on the same bytes: a figure
    that a slower window of the machine moves less than seconds (both slow down together)."""
    case = _case(report, r)
    mbps = _cli_mbps(report, case["size"], case["profile"])
    return r["total_seconds"] / (_bytes(case["size"]) / 1e6 / mbps) if mbps else None


def _cpu_floor(report: Report, size: str, plain: Row | None, stream: Row | None) -> float | None:
    """The lowest in-band CPU ratio to `stream` that the codec allows: a plain migration's CPU plus
    the in-band codec's own CPU on the same bytes (bench.run.codec_alone), over stream's CPU."""
    refs = report["references"].get("mixed" if size == report["size"] else f"mixed {size}", {})
    mbps = refs.get("in-band codec alone, CPU")
    if not (mbps and plain and stream and stream["cpu_total"]):
        return None
    return (plain["cpu_total"] + _bytes(size) / 1e6 / mbps) / stream["cpu_total"]


def _with_floor(target: Target, floor: float | None) -> Target:
    name, figure, met = target
    if floor is None or met is None:
        return target
    return name, f"{figure}; floor {floor:.2f}x (none's CPU + the codec's own)", met


def _link_bound(report: Report, r: Row) -> bool:
    """The case's wire bytes take at least half its time on its shaped link: its time follows the
    link, not the CPU, so it is not scaled by the CLI's time (which only follows the CPU)."""
    bits = report.get("links", {}).get(r["link"])
    return bool(bits) and r["wire_bytes"] * 8 / bits >= 0.5 * r["total_seconds"]


def _slower(report: Report, previous: Report | None) -> Target:
    name = "nothing gets slower than the previous run (a case is slower only if its time is, both in " \
           "seconds and in units of its run's CLI time; link-bound cases in seconds: geometric mean <= " \
           f"{SLOWER_MEAN}x, none > {SLOWER_WORST}x)"
    if previous is None:
        return name, NO_DATA, None
    raw, scaled = {}, {}
    for r in report["results"]:
        old = _find(previous, **_case(report, r))
        now, then = _against_cli(report, r), old and _against_cli(previous, old)
        if old and old["total_seconds"] and now and then:
            key = " ".join(v for v in _case(report, r).values() if v)
            raw[key] = r["total_seconds"] / old["total_seconds"]
            scaled[key] = raw[key] if _link_bound(report, r) else now / then
    if not raw:
        return name, NO_DATA, None
    # A slow window of the machine slows the seconds; a slow window for the single-threaded CLI
    # alone (it ran at half speed in one run here) shrinks the scaled figure. A change that slows
    # a case shows in both, so the smaller of the two is the case's verdict.
    judged = {key: min(raw[key], scaled[key]) for key in raw}

    def summary(ratios: dict[str, float], unit: str) -> tuple[str, bool]:
        mean = math.exp(sum(math.log(v) for v in ratios.values()) / len(ratios))
        worst = max(ratios, key=ratios.__getitem__)
        return (f"{unit}: mean {mean:.2f}x, slowest {ratios[worst]:.2f}x ({worst})",
                mean <= SLOWER_MEAN and ratios[worst] <= SLOWER_WORST)

    figures = [summary(ratios, unit)[0] for ratios, unit in ((raw, "seconds"), (scaled, "in CLI times"))]
    text, ok = summary(judged, "judged")
    return name, f"{len(raw)} cases; {'; '.join(figures)}; {text}", ok


def targets(report: Report, previous: Report | None = None) -> list[Target]:
    """Each target of issue 13, measured in this run; ratios are of figures taken side by side."""
    def row(method: str, size: str = SMALL, link: str = "unlimited", **case: str) -> Row | None:
        return _find(report, method=method, size=size, link=link, **{**IDLE_GUEST, **case})

    cli = _cli_mbps(report, SMALL, "mixed")
    out = [
        _ratio("256 MiB none, loopback: total time <= 1.0x the zstd --fast CLI's time", 1.0,
               _get(row("none"), "total_seconds"), _bytes(SMALL) / 1e6 / cli if cli else None),
        _ratio("256 MiB in-band data phase (first page to END) >= 1.1x the CLI's MB/s", 1.1,
               _get(row("xenguest"), "data_mbps"), cli, at_least=True),
        _ratio("256 MiB in-band whole migration >= 0.65x the CLI's MB/s", 0.65,
               _get(row("xenguest"), "guest_mbps"), cli, at_least=True),
    ]
    for size in (SMALL, LARGE):
        out.append(_ratio(f"{_label(size)} in-band total time <= 0.6x stream, loopback", 0.6,
                          _get(row("xenguest", size), "total_seconds"), _get(row("stream", size), "total_seconds")))
        out.append(_with_floor(_ratio(f"{_label(size)} in-band CPU <= 0.6x stream, loopback", 0.6,
                                      _get(row("xenguest", size), "cpu_total"), _get(row("stream", size), "cpu_total")),
                               _cpu_floor(report, size, row("none", size), row("stream", size))))
    methods = ("none", "stream", "xenguest")
    shaped = "tc" if report["link_shaping"].startswith("tc") else "socket pacing"
    out += [
        _each_method("256 MiB fixed costs (start-up + tail) <= 0.35 s per migration", 0.35,
                     [row(m) for m in methods], "fixed_seconds"),
        _each_method("downtime of an idle 256 MiB VM <= 0.1 s", 0.1, [row(m) for m in methods],
                     "downtime_seconds"),
        _ratio(f"1 Gbit/s ({shaped}), {_label(report['size'])}: in-band time <= 0.47x none", 0.47,
               _get(row("xenguest", report["size"], "1gbit"), "total_seconds"),
               _get(row("none", report["size"], "1gbit"), "total_seconds")),
    ]
    for link in ("unlimited", "10gbit", "1gbit"):
        out.append(_ratio(f"random memory, {link}: in-band time <= 1.05x none", 1.05,
                          _get(row("xenguest", report["size"], link, profile="random"), "total_seconds"),
                          _get(row("none", report["size"], link, profile="random"), "total_seconds")))
    out.append(_slower(report, previous))
    return out


ADAPTIVE_SLACK = 1.05       # adaptive against the better of its two fixed choices, case by case


def adaptive_targets(report: Report, previous: Report | None = None) -> list[Target]:
    """Issue 14's targets, measured in this run (none compares with the previous run)."""
    out: list[Target] = []
    for link in ("unlimited", "10gbit", "1gbit"):
        ratios = {}
        for r in report["results"]:
            if r["link"] == link and r["method"] == "adaptive" and r.get("scenario") is None:
                case = {k: v for k, v in _case(report, r).items() if k != "method"}
                best = min((_get(_find(report, **case, method=m), "total_seconds") or math.inf)
                           for m in ("none", "xenguest"))
                if math.isfinite(best):
                    ratios[" ".join(v for v in case.values() if v and v != link)] = r["total_seconds"] / best
        name = f"{link}: adaptive time <= {ADAPTIVE_SLACK}x the better of none and xenguest, every profile"
        if not ratios:
            out.append((name, NO_DATA, None))
            continue
        worst = max(ratios, key=ratios.__getitem__)
        out.append((name, f"worst {ratios[worst]:.2f}x ({worst}); " + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items()),
                    ratios[worst] <= ADAPTIVE_SLACK))

    def scenario(name: str, method: str) -> Row | None:
        return next((r for r in report["results"] if r.get("scenario") == name and r["method"] == method), None)

    drop = {m: _get(scenario("link drop", m), "total_seconds") for m in ("none", "xenguest", "adaptive")}
    fixed = min((v for k, v in drop.items() if k != "adaptive" and v), default=None)
    out.append(_ratio("link drops from unlimited to 1 Gbit/s half-way (1 GiB): adaptive faster than both fixed "
                      "choices (< 1.0x the better)", 0.9999, drop["adaptive"], fixed))
    none, adaptive = scenario("dirty faster than the link", "none"), scenario("dirty faster than the link", "adaptive")
    name = "guest dirtying faster than 1 Gbit/s carries plain: adaptive converges where none does not (fewer " \
           "pages left for the paused pass, shorter downtime)"
    if none and adaptive and none.get("final_pass_pages") and adaptive.get("final_pass_pages") is not None:
        out.append((name, "; ".join(f"{m}: {r['iterations']:.0f} passes, {r['final_pass_pages']:.0f} pages paused, "
                                    f"downtime {r['downtime_seconds']:.3f} s" for m, r in (("none", none),
                                                                                          ("adaptive", adaptive))),
                    adaptive["final_pass_pages"] < none["final_pass_pages"]
                    and adaptive["downtime_seconds"] < none["downtime_seconds"]))
    else:
        out.append((name, NO_DATA, None))
    out.append(_ratio("evacuating 4 VMs of 256 MiB over 1 Gbit/s: adaptive aggregate time <= 0.5x none", 0.5,
                      _get(scenario("evacuate 4 VMs", "adaptive"), "total_seconds"),
                      _get(scenario("evacuate 4 VMs", "none"), "total_seconds")))
    return out


DELTA_WIRE = 0.05          # increment: the later passes' wire bytes with deltas, against without
DELTA_SLACK = 1.02         # dirty: never slower than without deltas by more than 2%


def delta_targets(report: Report, previous: Report | None = None) -> list[Target]:
    """Issue 15's targets, measured in this run: each scenario with and without deltas."""
    def pair(name: str, method: str) -> tuple[Row | None, Row | None]:
        rows = {r["method"]: r for r in report["results"] if r.get("scenario") == name}
        return rows.get(method), rows.get(method + "-nodelta")

    inc, inc_off = pair("increment, deltas", "xenguest")
    out = [_ratio(f"increment guest, 256 MiB, 1 Gbit/s: wire bytes after the first pass with deltas <= {DELTA_WIRE}x "
                  "without", DELTA_WIRE, _get(inc, "later_wire_bytes"), _get(inc_off, "later_wire_bytes")),
           _ratio("increment guest: total time with deltas < 1.0x without", 0.9999,
                  _get(inc, "total_seconds"), _get(inc_off, "total_seconds")),
           _ratio("increment guest: downtime with deltas < 1.0x without", 0.9999,
                  _get(inc, "downtime_seconds"), _get(inc_off, "downtime_seconds"))]
    dirty, dirty_off = pair("dirty, deltas", "adaptive")
    out.append(_ratio(f"dirty:50MB/s guest, adaptive: time with deltas <= {DELTA_SLACK}x without", DELTA_SLACK,
                      _get(dirty, "total_seconds"), _get(dirty_off, "total_seconds")))
    peaks = [(r["scenario"], r["cache_peak_bytes"]) for r in (inc, dirty) if r and r.get("cache_peak_bytes") is not None]
    bounds = {"increment, deltas": 256 << 20, "dirty, deltas": 64 << 20}      # bench/run.py's SCENARIOS
    name = "delta cache never above its bound (256 MiB set for increment, the 64 MiB default for dirty), " \
           "by xenguest's figures"
    out.append((name, "; ".join(f"{s}: peak {p / 2**20:.1f} MiB" for s, p in peaks) or NO_DATA,
                all(p <= bounds[s] for s, p in peaks) if peaks else None))
    return out


def _met(met: bool | None) -> str:
    return {True: "met", False: "NOT met", None: "n/a"}[met]


def targets_table(report: Report, previous: Report | None,
                  measure: Callable[[Report, Report | None], list[Target]]) -> list[str]:
    before = {name: figure for name, figure, _ in measure(previous, None)} if previous else {}
    lines = ["| target | previous run | this run | met |", "|---|---|---|---|"]
    for name, figure, met in measure(report, previous):
        lines.append(f"| {name} | {before.get(name, NO_DATA)} | {figure} | {_met(met)} |")
    return lines


def phases_table(report: Report) -> list[str]:
    lines = ["| size | link | method | handshake s | start-up s | data s | tail s | fixed s | data MB/s |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in report["results"]:
        p = r.get("phases")
        if p and r["profile"] == "mixed" and r["workload"] == "none":
            lines.append(f"| {r.get('size', report['size'])} | {r['link']} | {r['method']} | {p['handshake']:.3f} | "
                         f"{p['start_up']:.3f} | {p['data']:.3f} | {p['tail']:.3f} | {r['fixed_seconds']:.3f} | "
                         f"{r['data_mbps']:.0f} |")
    return lines


def write_markdown(report: Report, path: Path, previous: Report | None = None) -> None:
    spot = f" and a {report['spot_size']} point" if report.get("spot_size") else ""
    lines = [f"# Migration benchmark ({report['size']} VMs{spot}, median of "
             f"{report['reps']}, {report['cpus']} CPUs, {report['seconds']:.0f} s)", "",
             f"Links shaped by: {report['link_shaping']}. Every repetition runs every case (all sizes and "
             "links), the methods in turn.", "",
             "## Targets (issue 13; ratios of figures measured side by side in this run)", "",
             *targets_table(report, previous, targets), "",
             "## Targets (issue 14: adaptive compression; ratios of figures measured side by side in this run)", "",
             *targets_table(report, previous, adaptive_targets), "",
             "## Targets (issue 15: deltas of re-sent pages; with and without, side by side in this run)", "",
             *targets_table(report, previous, delta_targets), "",
             "## Phases (mixed memory, idle guest; seconds, median)", "",
             "handshake: connections and synchronisation points; start-up: emu-manager and xenguest until "
             "the first page; data: first page to xenguest's END; tail: END to the VM running on the "
             "destination. fixed = start-up + tail.", "", *phases_table(report), "",
             "## Canary per repetition", "",
             "The same fixed work in every repetition: emu-manager's CPU (pure start-up), the start-up phase and "
             "the zstd --fast CLI (wall seconds: they also rise when other work takes the CPUs). A repetition "
             "where they rise ran in a slow window of the machine.", "",
             "| repetition | emu-manager CPU s, median (min-max) | start-up s, median | zstd --fast CLI s (mixed) "
             "| elapsed s |", "|---:|---|---:|---:|---:|"]
    for c in report.get("canary", []):
        lines.append(f"| {c['rep']} | {c['emu_manager_cpu_median']:.2f} ({c['min']:.2f}-{c['max']:.2f}) | "
                     f"{c.get('start_up_median') or 0:.2f} | {c['zstd_cli_mixed_seconds']:.2f} | {c['elapsed']:.0f} |")
    lines += ["", "CPU seconds are summed over source and destination, per process role; `prev s` is the "
              "previous run's total time for the same case.", ""]
    for scenario, link in dict.fromkeys((r.get("scenario"), r["link"]) for r in report["results"]):
        lines += [f"## Link: {link}" if scenario is None else f"## Scenario: {scenario} ({link})", "",
                  "| size | profile | workload | method | total s | prev s | downtime s | passes | wire MiB | ratio | "
                  "guest MB/s | CPU s (total: per role) |",
                  "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
        for r in (r for r in report["results"] if r["link"] == link and r.get("scenario") == scenario):
            old = _find(previous, **_case(report, r)) \
                if previous else None
            roles = ", ".join(f"{k} {v:.2f}" for k, v in r["cpu_seconds"].items())
            prev = f"{old['total_seconds']:.2f}" if old else "-"
            passes = f"{r['iterations']:.0f}" if r.get("iterations") is not None else "-"
            lines.append(f"| {r.get('size', report['size'])} | {r['profile']} | {r['workload']} | {r['method']} | "
                         f"{r['total_seconds']:.2f} | {prev} | "
                         f"{r['downtime_seconds']:.3f} | {passes} | {r['wire_bytes'] / 2**20:.1f} | {r['ratio']:.2f} | "
                         f"{r['guest_mbps']:.0f} | {r['cpu_total']:.2f}: {roles} |")
        lines.append("")
    refs = report["references"]
    columns = list(next(iter(refs.values()), {}))
    lines += ["## Reference points (same memory bytes, MB/s of guest memory; median)", "",
              "| profile | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for profile, values in refs.items():
        lines.append(f"| {profile} | " + " | ".join(str(values.get(c, "")) for c in columns) + " |")
    path.write_text("\n".join(lines) + "\n")


def write_plot(report: Report, path: Path) -> None:
    """Migration time against link rate, one line per method (mixed memory, idle guest)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = {"1gbit": 1, "10gbit": 10, "unlimited": 40}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method in ("none", "stream", "xenguest", "adaptive"):
        pts = sorted((rates[r["link"]], r["total_seconds"]) for r in report["results"]
                     if r["method"] == method and r["profile"] == "mixed" and r["workload"] == "none"
                     and r.get("scenario") is None
                     and r.get("size", report["size"]) == report["size"])
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=method)
    ax.set_xscale("log")
    ax.set_xticks(list(rates.values()), ["1 Gbit/s", "10 Gbit/s", "unlimited\n(loopback)"])
    ax.set_ylabel("migration time (s, median)")
    ax.set_title(f"{report['size']} VM, 'mixed' memory, idle guest")
    ax.legend(title="compression")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
