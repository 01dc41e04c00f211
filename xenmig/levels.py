"""zstd levels for in-band compression: what each costs and shrinks, and the choice between them.

Apart from the codec (it imports neither numpy nor zstandard), so that xenguest can answer a
compression switch with the level in force before its codecs are loaded.
"""
from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class LevelFigures:
    compress_bytes_per_s: float     # guest memory compressed per second, one thread
    ratio: float                    # guest memory bytes per wire byte


# Measured on 256 MiB of `mixed` memory (one thread, 2-core machine): level -1 costs 1.5% more wire
# bytes than level 1 but 14% less CPU, and inflates about twice as fast on the destination.
LEVEL_FIGURES: dict[int, LevelFigures] = {-1: LevelFigures(515e6, 2.58), 1: LevelFigures(432e6, 2.62)}


def choose_level(link_bytes_per_s: float | None, threads: int = 1,
                 figures: dict[int, LevelFigures] = LEVEL_FIGURES) -> int:
    """The level that moves guest memory fastest: a level's seconds per byte are the slower of
    compressing it on `threads` and sending what is left of it (no link rate: compression alone).
    The place where adaptive compression switches level per batch from the rates it measures."""
    def seconds(level: int) -> float:
        f = figures[level]
        return max(1 / (f.compress_bytes_per_s * threads), 1 / (f.ratio * link_bytes_per_s) if link_bytes_per_s else 0)
    return min(figures, key=seconds)


# An unlimited link (loopback, 10 Gbit/s) is compression-bound: level -1. A 1 Gbit/s link is
# wire-bound and choose_level gives level 1.
DEFAULT_LEVEL = choose_level(None)


def default_level() -> int:
    """The level a save starts at: DEFAULT_LEVEL, or XENGUEST_COMPRESS_LEVEL for experiments."""
    return int(os.environ.get("XENGUEST_COMPRESS_LEVEL", DEFAULT_LEVEL))
