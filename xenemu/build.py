"""The domain builder: a new domain with its initial memory and context."""
from __future__ import annotations

import signal
from pathlib import Path

from . import context, profiles
from .domain import Domain
from .host import Host
from .memory import PAGE_SIZE


def build(host: Host, name: str, memory_bytes: int, *, image: str = "zero", seed: int = 0,
          workload: str = "none", vgpu_bytes: int = 0, start: bool = True, meta: dict | None = None) -> Domain:
    """Create, fill and (unless told not to) start a domain; nothing is left if it fails."""
    from .workload import parse_spec

    parse_spec(workload)
    domain = None
    try:
        # A SIGINT or SIGTERM waits until `domain` is set, so a cancelled build can destroy it.
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        try:
            domain = host.create_domain(name, memory_bytes,
                                        meta={"workload": workload, "vgpu_bytes": vgpu_bytes, **(meta or {})})
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        mem = domain.memory
        if image in profiles.PROFILES:
            profiles.fill(mem.pages, image, seed)
        else:
            profiles.fill_from_file(mem.pages, Path(image))
        if vgpu_bytes:
            vgpu = domain.vgpu_memory()
            profiles.fill(vgpu.reshape(-1, PAGE_SIZE), "mixed", seed + 1)
            vgpu.flush()
        domain.set_context(context.synthesize(seed, mem.npages))
        domain.update(state="paused")
        if start:
            domain.unpause()
    except BaseException:
        if domain is not None:
            domain.destroy()
        raise
    return domain
