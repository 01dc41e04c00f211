"""The guest: a process that keeps writing a running domain's memory.

Specs: `none`; `dirty:RATE` (random pages rewritten with realistic content at
RATE bytes/s); `increment[:RATE]` (one byte of every page incremented in a
loop, as QEMU's migration-test guest does, so a page restored from the wrong
moment stands out); `zeroing[:RATE]` (every page given data, then every page zeroed, in
turn, so pages sent with data in one pass are zero in a later one). Run as `python -m xenemu.workload ROOT DOMID`.
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .memory import CTL_DYING, PAGE_SIZE

TICK = 0.01
DEFAULT_INCREMENT_RATE = 64 << 20


@dataclass(frozen=True)
class Workload:
    kind: str          # none | dirty | increment | zeroing
    rate: int          # bytes/s worth of pages touched


def parse_spec(spec: str) -> Workload:
    from .units import parse_rate

    kind, _, arg = spec.partition(":")
    if kind == "none" and not arg:
        return Workload("none", 0)
    if kind == "dirty" and arg:
        return Workload("dirty", parse_rate(arg))
    if kind in ("increment", "zeroing"):
        return Workload(kind, parse_rate(arg) if arg else DEFAULT_INCREMENT_RATE)
    raise ValueError(f"invalid workload {spec!r} (none, dirty:RATE e.g. dirty:50MB/s, increment[:RATE], "
                     "zeroing[:RATE])")


def run(root: Path, domid: int, ready: int | None = None) -> None:
    """Write the domain's memory until it dies; `ready` (an fd) is closed once the guest is
    set up and about to write, so a domain reported running has a guest that runs."""
    import numpy as np      # here, not at the top: the toolstack imports parse_spec and never runs a guest

    from .domain import Domain
    from .profiles import PROFILES, realistic_pages

    domain = Domain(root / "domains" / str(domid))
    workload = parse_spec(domain.meta.get("workload", "none"))
    mem = domain.memory
    rng = np.random.default_rng(domid)
    if workload.kind == "dirty":
        content = realistic_pages(rng, 1024, (0.0, *PROFILES["mixed"][1:]))
    pages_per_s = workload.rate / PAGE_SIZE
    cursor = 0
    stamp = 0
    filling = True
    budget = 0.0
    last = time.monotonic()
    if ready is not None:
        os.close(ready)
    while workload.kind != "none":
        time.sleep(TICK)
        now = time.monotonic()
        budget = min(budget + (now - last) * pages_per_s, pages_per_s)  # at most 1 s of backlog
        last = now
        n = min(int(budget), mem.npages)
        if not domain.dir.exists() or mem.ctl[CTL_DYING]:
            return
        if n == 0:
            continue
        with mem.locked():
            if mem.paused:       # the guest is paused: it writes nothing, and waits
                budget = 0.0
                continue
            if workload.kind == "dirty":
                pfns = rng.integers(0, mem.npages, size=n)
                mem.pages[pfns] = content[rng.integers(0, content.shape[0], size=n)]
                stamp += 1
                mem.pages[pfns, :8] = np.frombuffer(np.uint64(stamp).tobytes(), dtype=np.uint8)
            else:
                pfns = (cursor + np.arange(n)) % mem.npages
                wrapped = cursor + n >= mem.npages
                cursor = int(pfns[-1] + 1) % mem.npages
                if workload.kind == "increment":
                    mem.pages[pfns, 0] += 1
                else:
                    mem.pages[pfns] = 0
                    if filling:
                        stamp += 1
                        mem.pages[pfns, :8] = np.frombuffer(np.uint64(stamp).tobytes(), dtype=np.uint8)
                    filling ^= wrapped
            mem.dirty[pfns] = 1
        budget -= n


def main() -> None:
    root, domid = Path(sys.argv[1]), int(sys.argv[2])
    wait, ready = os.pipe()
    pid = os.fork()
    if pid:
        os.close(ready)
        os.read(wait, 1)        # b"" once the guest closed it: set up, or dead (the caller checks)
        print(pid, flush=True)
        os._exit(0)
    os.close(wait)
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)
    run(root, domid, ready)


if __name__ == "__main__":
    main()
