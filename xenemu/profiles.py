"""Initial guest memory built from real content found on this machine.

Compression results mean something only if the pages look like a guest's:
zero pages, machine code, text and incompressible data in realistic
proportions. The content comes from shared libraries and Python sources on
the machine (sorted, so a seed gives the same image on the same machine).
"""
from __future__ import annotations

import glob
import os
import sys
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

from .memory import PAGE_SIZE

if TYPE_CHECKING:      # loaded when pages are made: listing the profiles (every CLI) needs no numpy
    import numpy as np

# Fractions of pages of each kind: (zero, code, text, random).
PROFILES: dict[str, tuple[float, float, float, float]] = {
    "zero": (1.0, 0.0, 0.0, 0.0),
    "idle": (0.88, 0.05, 0.05, 0.02),
    "mixed": (0.25, 0.30, 0.25, 0.20),
    # A guest that has overwritten every zero page: no batch has one to skip, so every
    # page of a batch goes through the compressor (the case that tests must drive).
    "busy": (0.0, 0.40, 0.40, 0.20),
    "random": (0.0, 0.0, 0.0, 1.0),
}
_POOL_BYTES = 16 << 20
_BATCH_PAGES = 16384


def _read_pool(patterns: list[str], limit: int) -> np.ndarray:
    """Concatenate real files (sorted for determinism) up to `limit` bytes."""
    import numpy as np

    chunks: list[bytes] = []
    total = 0
    for pattern in patterns:
        for path in sorted(glob.glob(pattern, recursive=True)):
            if total >= limit:
                break
            try:
                if not os.path.isfile(path) or os.path.islink(path):
                    continue
                with open(path, "rb") as f:
                    data = f.read(limit - total)
            except OSError:
                continue
            chunks.append(data)
            total += len(data)
    pool = np.frombuffer(b"".join(chunks), dtype=np.uint8)
    if pool.size < PAGE_SIZE * 16:
        raise RuntimeError(f"not enough real content found for memory profiles ({patterns})")
    return pool


@lru_cache(maxsize=None)
def code_pool() -> np.ndarray:
    stdlib = os.path.dirname(os.__file__)
    return _read_pool([
        "/usr/lib/x86_64-linux-gnu/*.so*", "/usr/lib/aarch64-linux-gnu/*.so*",
        os.path.join(stdlib, "lib-dynload", "*.so"), os.path.join(sys.prefix, "lib", "*.so*"),
    ], _POOL_BYTES)


@lru_cache(maxsize=None)
def text_pool() -> np.ndarray:
    stdlib = os.path.dirname(os.__file__)
    return _read_pool([os.path.join(stdlib, "*.py"), os.path.join(stdlib, "*", "*.py"),
                       "/usr/share/common-licenses/*"], _POOL_BYTES)


def _gather(pool: np.ndarray, rng: np.random.Generator, n: int) -> np.ndarray:
    """`n` page-sized windows of `pool` at random 64-byte-aligned offsets."""
    import numpy as np

    offsets = rng.integers(0, (pool.size - PAGE_SIZE) // 64, size=n) * 64
    windows = np.lib.stride_tricks.sliding_window_view(pool, PAGE_SIZE)
    return windows[offsets]


def realistic_pages(rng: np.random.Generator, n: int, weights: tuple[float, float, float, float]) -> np.ndarray:
    """An (n, 4096) array of pages drawn by kind with the given weights."""
    import numpy as np

    pages = np.zeros((n, PAGE_SIZE), dtype=np.uint8)
    kinds = rng.choice(4, size=n, p=np.array(weights) / sum(weights))
    for kind, pool in ((1, code_pool), (2, text_pool)):
        idx = np.flatnonzero(kinds == kind)
        if idx.size:
            pages[idx] = _gather(pool(), rng, idx.size)
    idx = np.flatnonzero(kinds == 3)
    if idx.size:
        pages[idx] = rng.integers(0, 256, size=(idx.size, PAGE_SIZE), dtype=np.uint8)
    return pages


def fill(pages: np.ndarray, profile: str, seed: int) -> None:
    """Write the profile into `pages` (an (npages, 4096) view of guest memory)."""
    import numpy as np

    if profile not in PROFILES:
        raise ValueError(f"unknown memory profile {profile!r} (one of {', '.join(PROFILES)})")
    weights = PROFILES[profile]
    if weights[0] == 1.0:
        return
    rng = np.random.default_rng(seed)
    for start in range(0, pages.shape[0], _BATCH_PAGES):
        end = min(start + _BATCH_PAGES, pages.shape[0])
        batch = realistic_pages(rng, end - start, weights)
        nonzero = batch.any(axis=1)
        pages[start:end][nonzero] = batch[nonzero]


def fill_from_file(pages: np.ndarray, path: Path) -> None:
    """Load an image file; shorter than memory leaves the rest zero."""
    flat = pages.reshape(-1)
    with open(path, "rb") as f:
        n = f.readinto(memoryview(flat))  # type: ignore[arg-type]
    if n is None:
        raise OSError(f"cannot read {path}")
