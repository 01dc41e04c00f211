"""The benchmark's report: a table per link, the targets as ratios from this run, a plot."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

Row = dict[str, Any]


def _find(results: list[Row], **match: str) -> Row | None:
    return next((r for r in results if all(r[k] == v for k, v in match.items())), None)


def targets(report: dict[str, Any]) -> list[tuple[str, str, bool | None]]:
    """(target, figure, met?) for each target of the issue; None when this run has no data for it."""
    res = report["results"]
    out: list[tuple[str, str, bool | None]] = []

    def ratio(name: str, limit: float, num: Row | None, den: Row | None, key: str | Callable[[Row], float]) -> None:
        get = (lambda r: r[key]) if isinstance(key, str) else key
        if num is None or den is None or not get(den):
            out.append((name, "no data in this run", None))
            return
        value = get(num) / get(den)
        out.append((name, f"{value:.2f}x (limit {limit}x)", value <= limit))

    unl = dict(link="unlimited", profile="mixed", workload="none")
    ratio("unlimited, mixed: in-band total time <= 0.7x stream", 0.7,
          _find(res, method="xenguest", **unl), _find(res, method="stream", **unl), "total_seconds")
    ratio("unlimited, mixed: in-band CPU seconds <= 0.6x stream", 0.6,
          _find(res, method="xenguest", **unl), _find(res, method="stream", **unl), "cpu_total")
    gig = dict(link="1gbit", profile="mixed", workload="none")
    ratio("1 Gbit/s, mixed: in-band total time <= 0.4x uncompressed", 0.4,
          _find(res, method="xenguest", **gig), _find(res, method="none", **gig), "total_seconds")
    for link in ("unlimited", "10gbit", "1gbit"):
        rnd = dict(link=link, profile="random", workload="none")
        ratio(f"{link}, random: in-band total time <= 1.05x uncompressed", 1.05,
              _find(res, method="xenguest", **rnd), _find(res, method="none", **rnd), "total_seconds")
    inband = _find(res, method="xenguest", **unl)
    cli = report["references"].get("mixed", {}).get("zstd --fast CLI")
    if inband and cli:
        value = inband["guest_mbps"] / cli
        out.append(("unlimited, mixed: in-band guest MB/s >= 0.6x zstd --fast CLI MB/s",
                    f"{value:.2f}x ({inband['guest_mbps']:.0f} vs {cli:.0f} MB/s; limit 0.6x)", value >= 0.6))
    dirty = dict(link="unlimited", profile="mixed", workload="dirty:50MB/s")
    ratio("dirty:50MB/s downtime: in-band <= uncompressed", 1.0,
          _find(res, method="xenguest", **dirty), _find(res, method="none", **dirty), "downtime_seconds")
    return out


def write_markdown(report: dict[str, Any], path: Path) -> None:
    lines = [f"# Migration benchmark ({report['size']} VMs, median of {report['reps']}, "
             f"{report['cpus']} CPUs, {report['seconds']:.0f} s)", "",
             f"Links shaped by: {report['link_shaping']}.", "",
             "CPU seconds are summed over source and destination, per process role.", ""]
    for link in dict.fromkeys(r["link"] for r in report["results"]):
        lines += [f"## Link: {link}", "",
                  "| profile | workload | method | total s | downtime s | wire MiB | ratio | guest MB/s | CPU s (total: per role) |",
                  "|---|---|---|---:|---:|---:|---:|---:|---|"]
        for r in (r for r in report["results"] if r["link"] == link):
            roles = ", ".join(f"{k} {v:.2f}" for k, v in r["cpu_seconds"].items())
            lines.append(f"| {r['profile']} | {r['workload']} | {r['method']} | {r['total_seconds']:.2f} | "
                         f"{r['downtime_seconds']:.3f} | {r['wire_bytes'] / 2**20:.1f} | {r['ratio']:.2f} | "
                         f"{r['guest_mbps']:.0f} | {r['cpu_total']:.2f}: {roles} |")
        lines.append("")
    lines += ["## Reference points (same memory bytes, MB/s of guest memory)", "",
              "| profile | " + " | ".join(next(iter(report["references"].values()), {}).keys()) + " |",
              "|---|" + "---:|" * len(next(iter(report["references"].values()), {}))]
    for profile, refs in report["references"].items():
        lines.append(f"| {profile} | " + " | ".join(str(v) for v in refs.values()) + " |")
    lines += ["", "## Targets (ratios measured side by side in this run)", "", "| target | figure | met |",
              "|---|---|---|"]
    for name, figure, met in targets(report):
        lines.append(f"| {name} | {figure} | {'yes' if met else 'no' if met is False else 'n/a'} |")
    path.write_text("\n".join(lines) + "\n")


def write_plot(report: dict[str, Any], path: Path) -> None:
    """Migration time against link rate, one line per method (mixed memory, idle guest)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = {"1gbit": 1, "10gbit": 10, "unlimited": 40}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method in ("none", "stream", "xenguest"):
        pts = sorted((rates[r["link"]], r["total_seconds"]) for r in report["results"]
                     if r["method"] == method and r["profile"] == "mixed" and r["workload"] == "none")
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
