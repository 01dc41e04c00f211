"""Writing a VM's suspend image: xenopsd's framing around emu-manager's streams.

The same code serves `vm-suspend` (to a file) and `vm-migrate` (to a
socket): signature, Xenops record, then emu-manager runs and asks for
`suspend:` (pause the domain) and `prepare:<emu>` (write that emulator's
header first), then the Qemu_trad record and End_of_image on the main fd,
then on the vGPU fd (xc/domain.ml suspend closes every stream fd so).
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Callable

from xenemu import Domain
from xenmig import control as ctl
from xenmig import image
from xenmig.fdio import write_all

from .accounting import CpuAccounting
from .codecs import Codec
from .emuctl import EmuManager, EmuManagerError
from .inband import InBand
from .log import Logger

Progress = Callable[[int, str], None]       # percent done, and what in-band compression does


def vm_metadata(domain: Domain) -> bytes:
    """The VM's own metadata (JSON): what the receiver needs to create the domain."""
    meta = domain.reload()
    return json.dumps({"name": meta["name"], "uuid": meta["uuid"], "memory_bytes": meta["memory_bytes"],
                       "workload": meta.get("workload", "none"), "vgpu_bytes": meta.get("vgpu_bytes") or 0},
                      sort_keys=True).encode()


def vm_record(domain: Domain) -> bytes:
    """The Xenops record as the real xenopsd writes it (an empty xs_subtree), our metadata as its vm_str."""
    return image.build_xenops_record(image.XenopsRecord(image.now(), image.WORD_SIZE,
                                                        vm_str=vm_metadata(domain).decode(), xs_subtree=[]))


@dataclass
class SaveStats:
    paused_at: float | None = None
    first_page_at: float | None = None   # trace points for the summary's phases: xenguest starts sending
    last_page_at: float | None = None    # ... and has sent its END (emu-manager's result)
    iterations: int = 0
    pages: int = 0
    zero_pages: int = 0
    emu_argv: list[str] = field(default_factory=list)


class ImageWriter:
    def __init__(self, domain: Domain, fd: int, *, live: bool, codec: Codec, log: Logger,
                 on_info: Progress = lambda p, s: None, vgpu_fd: int | None = None,
                 watch: Callable[[], None] | None = None, inband: InBand | None = None,
                 delta_cache: int = 0) -> None:
        """`delta_cache`: the bound of xenguest's cache of sent pages (0: it sends no deltas)."""
        self.domain = domain
        self.delta_cache = delta_cache
        self.watch = watch
        self.fd = fd
        self.vgpu_fd = vgpu_fd
        self.live = live
        self.codec = codec
        self.log = log
        self.on_info = on_info
        self.stats = SaveStats()
        self.emu: EmuManager | None = None
        self.inband = inband or InBand(log)     # a suspend has no switches, but xenguest reports its passes

    def _progress(self, percent: int) -> None:
        self.on_info(percent, self.inband.state())

    def _suspend(self, _: str) -> None:
        self.domain.pause()
        self.stats.paused_at = time.monotonic()
        self.inband.paused()
        self.log.info(f"domain {self.domain.domid} paused")

    def _prepare(self, emu: str) -> None:
        """Each emulator's stream starts with its header, on that emulator's own fd."""
        if emu == "xenguest":
            write_all(self.fd, [image.build_header(image.LIBXC)])
            self.stats.first_page_at = time.monotonic()
        elif emu == "vgpu" and self.vgpu_fd is not None:
            write_all(self.vgpu_fd, [image.build_header(image.DEMU)])
        else:
            raise EmuManagerError(f"protocol error: prepare for unknown emulator {emu!r}")

    def _delta_args(self) -> tuple[str, ...]:
        return ("-delta-cache", str(self.delta_cache)) if self.delta_cache else ()

    def run(self) -> SaveStats:
        record = vm_record(self.domain)
        write_all(self.fd, [image.SIGNATURE, image.build_header(image.XENOPS, len(record)), record])
        vgpu = ([] if self.vgpu_fd is None else ["-dm", f"vgpu:{self.vgpu_fd}"])
        self.emu = EmuManager(domid=self.domain.domid, mode="hvm_save", fd=self.fd, live=self.live,
                              codec_args=self.codec.emu_args + self._delta_args(), extra=vgpu, log=self.log,
                              pass_fds=() if self.vgpu_fd is None else (self.vgpu_fd,))
        self.stats.emu_argv = self.emu.argv
        self.emu.reports.append(self.inband.take)
        self.inband.attach(self.emu.send)
        self.emu.serve({ctl.MSG_SUSPEND: self._suspend, ctl.MSG_PREPARE: self._prepare},
                       until=lambda line: line.startswith(ctl.MSG_RESULT), on_info=self._progress, watch=self.watch)
        self.stats.last_page_at = time.monotonic()
        self.inband.close()
        memory = self.emu.save_stats.get("xenguest", {})
        self.stats.iterations, self.stats.pages = memory.get("iterations", 0), memory.get("pages", 0)
        self.stats.zero_pages = memory.get("zero_pages", 0)
        # The emulators' streams are complete once the result is in: the rest of the image goes
        # now, while emu-manager quits them, so the destination is not kept waiting for that.
        dm = self.domain.context().get("device_model", b"")
        write_all(self.fd, [image.build_header(image.QEMU_TRAD, len(dm)), dm, image.build_header(image.END_OF_IMAGE)])
        if self.vgpu_fd is not None:        # every stream fd ends with its footer, the main one first
            write_all(self.vgpu_fd, [image.build_header(image.END_OF_IMAGE)])
        code = self.emu.finish()            # before the commit: a failing emu-manager fails the save
        if code != 0:
            raise EmuManagerError(f"emu-manager exited with status {code} after its result")
        return self.stats

    def account(self, cpu: CpuAccounting) -> None:
        """emu-manager's CPU and its emulators', once it has been reaped."""
        if self.emu is not None:
            self.emu.account(cpu)

    def close(self) -> None:
        """Release emu-manager: `abort` first if it still runs, then wait for it and its emulators."""
        self.inband.close()
        if self.emu is not None:
            self.emu.close()
            self.emu = None
