"""The domain builder: a new domain with its initial memory and context."""
from __future__ import annotations

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
    if vgpu_bytes % PAGE_SIZE:
        raise ValueError(f"vGPU memory {vgpu_bytes} is not a multiple of {PAGE_SIZE}")
    domain = host.create_domain(name, memory_bytes,
                                meta={"workload": workload, "vgpu_bytes": vgpu_bytes, **(meta or {})})
    try:
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
        domain.destroy()
        raise
    return domain
