"""CPU seconds per process role of one migration, each known when its process is reaped.

No sampling: the shim reaps its own children (emu-manager, zstd) with wait4,
whose resource usage is exact and includes what they reaped themselves;
emu-manager reports its emulators' CPU the same way (control.MSG_CPU), so its
own share is its figure less theirs. The shim's own CPU is its own clock.
"""
from __future__ import annotations

import time
from typing import Callable, Mapping

SHIM = "xenopsd-shim"
EMU_MANAGER = "emu-manager"
ZSTD = "zstd"
# An emulator's role is its executable's name; emu-manager names it by its table's name.
EMULATOR_ROLES = {"xenguest": "xenguest", "vgpu": "vgpu-emu"}


class CpuAccounting:
    """Collects each reaped process's CPU under its role; `own` is the shim's own clock
    (the whole process for a one-shot command, the thread of a migration in `serve`)."""

    def __init__(self, own: Callable[[], float] = time.process_time) -> None:
        self._own = own
        self._base = own()
        self._roles: dict[str, float] = {}

    def add(self, role: str, seconds: float) -> None:
        self._roles[role] = self._roles.get(role, 0.0) + seconds

    def add_codec(self, seconds: float | None) -> None:
        """A codec's process (zstd), once reaped; None: it has none, or was not reaped."""
        if seconds is not None:
            self.add(ZSTD, seconds)

    def add_emu_manager(self, total: float, emulators: Mapping[str, float]) -> None:
        """emu-manager's wait4 figure (its emulators' included) split into its own and each
        emulator's, by what it reported of them."""
        for emu, seconds in emulators.items():
            self.add(EMULATOR_ROLES.get(emu, emu), seconds)
        self.add(EMU_MANAGER, max(0.0, total - sum(emulators.values())))

    def by_role(self) -> dict[str, float]:
        """The shim's own CPU so far, and every reaped process's, rounded to milliseconds."""
        return {SHIM: round(self._own() - self._base, 3), **{r: round(s, 3) for r, s in self._roles.items()}}
