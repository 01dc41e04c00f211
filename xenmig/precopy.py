"""The pre-copy interface between a saver and whoever drives it (libxc's save callbacks).

The saver (xenguest) asks a precopy policy before each pass; the EMP server
(every emulator) supplies that policy from what emu-manager says, and raises
`Aborted` when migrate_abort arrives.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class PrecopyStats:
    """libxc's struct precopy_stats, what a precopy policy decides from."""
    iteration: int = 0
    total_written: int = 0      # pages sent by the passes before this one
    dirty_count: int = -1       # pages this pass would send; -1 while unknown


# True: stop pre-copy and suspend (XGS_POLICY_STOP_AND_COPY); False: another pass.
PrecopyPolicy = Callable[[PrecopyStats], bool]


class Aborted(Exception):
    """migrate_abort arrived; the stream is left incomplete on purpose."""
