"""`xenguest -mode listen`: xenguest's part of EMP, saving and restoring domain memory."""
from __future__ import annotations

import importlib
import threading
from typing import TYPE_CHECKING

from xenemu import Domain, Host

from xenmig import emp
from xenmig.empserver import SET_ARG_BOOL, SET_ARG_INT, EmpServer, Work
from xenmig.levels import default_level
from xenmig.log import Log

if TYPE_CHECKING:
    from .adaptive import AdaptivePages

# What a save or restore needs (numpy and the codecs, most of xenguest's start-up): loaded on a thread
# once Ready is printed, while emu-manager connects and sends migrate_init, set_args and track_dirty.
# save() and restore() import them too; the import lock makes them wait until the loading is done.
COPY_MODULES = ("xenguest.save", "xenguest.restore")


class Server(EmpServer):
    # xenguest's setable_args (do_cmd_set_args); a restore needs both ports (do_cmd_restore).
    SET_ARGS = {"store_port": SET_ARG_INT, "console_port": SET_ARG_INT, "pv": SET_ARG_BOOL, "vgpu": SET_ARG_BOOL}

    def __init__(self, host: Host, domid: int, *, compress: bool, delta_cache: int = 0, log: Log) -> None:
        super().__init__(host, domid, host.xenguest_socket(domid), log=log)
        self.start_mode = emp.MODE_ON if compress else emp.MODE_OFF
        self.delta_cache = delta_cache          # bytes (-delta-cache); a save's encoder makes the cache
        self.encoder: AdaptivePages | None = None       # made by the save (it loads numpy)
        self.early: list[tuple[str, int | None]] = []     # switches before it, for it to take in order

    def _encoder(self) -> AdaptivePages:
        if self.encoder is None:
            from .adaptive import AdaptivePages
            self.encoder = AdaptivePages(self.start_mode, delta_cache=self.delta_cache)
            for mode, level in self.early:
                self.encoder.switch(mode, level)
        return self.encoder

    def compress(self, mode: str, level: int | None) -> int:
        """Runs on the EMP thread; the save's encoder takes it from its next batch. A switch that
        comes before the save (adaptive's `auto`, right after migrate_init) waits for the encoder
        in `early`: making the encoder here would hold this thread, and the replies to track_dirty
        and migrate_progress behind it, until numpy and the codecs are loaded."""
        if self.encoder is None:
            self.early.append((mode, level))
            levels = [lv for _, lv in self.early if lv is not None]     # as switch(): a level stays
            applied = levels[-1] if levels else default_level()
        else:
            applied = self.encoder.switch(mode, level)
        self.log.info(f"in-band compression {mode}, level {applied}")
        return applied

    def iteration(self, figures: dict) -> None:
        if self.chan is not None:
            self.chan.send(emp.iteration_event(figures))

    def ready(self) -> None:
        threading.Thread(target=_load_copy_modules, name="load-copy-modules", daemon=True).start()

    def _domain(self) -> Domain:
        return self.host.domain(self.domid)

    def track_dirty(self) -> None:
        self._domain().memory.clean_all()

    def save(self, live: bool) -> Work:
        from .save import Saver

        assert self.stream_fd is not None
        saver = Saver(self._domain(), self.stream_fd, live=live, policy=self.precopy_policy,
                      suspend=self.wait_paused, on_pass_progress=self.pass_progress,
                      encoder=self._encoder(), abort=self.abort, on_iteration=self.iteration)

        def work() -> str:
            progress = saver.run()
            self.log.info(progress.summary(self.domid))
            if self.chan is not None:       # the figures, as a message, before the completion event
                self.chan.send(emp.save_stats_event(progress.stats()))
            return "0 0"
        return work

    def restore(self) -> Work:
        from .restore import Restorer

        domain = self._domain()
        assert self.stream_fd is not None
        if "store_port" not in self.args or "console_port" not in self.args:
            raise ValueError("Missing options: a restore needs store_port and console_port (set_args)")
        if domain.state != "building":
            raise ValueError(f"domain {self.domid} is {domain.state}; restore needs a new domain")
        restorer = Restorer(domain, self.stream_fd)

        def work() -> str:
            result = restorer.run()
            return f"{result.store_mfn} {result.console_mfn}"
        return work


def _load_copy_modules() -> None:
    """Import what a save or restore needs; an import error shows again where they are used."""
    for name in COPY_MODULES:
        try:
            importlib.import_module(name)
        except Exception:       # noqa: BLE001 - reported by save()/restore() when they import it
            return
