"""`vgpu-emu -domid D -mode listen`: the vGPU emulator emu-manager starts for `-dm vgpu:FD`.

Saves the GPU memory as one pass (while the guest runs, if live: nothing
dirties it here), reports it, waits for the domain to be paused, and ends
the stream; restores it chunk by chunk into the new domain.
"""
from __future__ import annotations

import sys


from xenemu import Domain, DomainError, Host
from xenmig.empserver import EmpServer, Work
from xenmig.fdio import Reader, Truncated, write_all
from xenmig.log import Log
from xenmig.longopts import Opt, UsageError, parse
from xenmig.procwait import exit_now

from . import stream

PROG = "vgpu-emu"
OPTIONS = [Opt("domid", "int", required=True), Opt("mode", required=True), Opt("debug", "flag")]
PAGE = 4096


class VgpuServer(EmpServer):
    def _domain(self) -> Domain:
        return self.host.domain(self.domid)

    def save(self, live: bool) -> Work:
        domain = self._domain()
        fd = self.stream_fd
        assert fd is not None

        def work() -> str:
            vgpu = domain.vgpu_memory()
            write_all(fd, [stream.build_header(vgpu.size)])
            pages = vgpu.size // PAGE
            for offset in range(0, vgpu.size, stream.MAX_CHUNK):
                if self.abort.is_set():
                    raise DomainError("vGPU save aborted")
                chunk = vgpu[offset:offset + stream.MAX_CHUNK]
                write_all(fd, [stream.build_chunk(offset, chunk.size), chunk])
            if live:
                self.event(pages, 0, 1)           # one pass, nothing dirty after it
            self.wait_paused()
            write_all(fd, [stream.build_chunk(vgpu.size, 0, stream.KIND_END)])
            self.log.info(f"vGPU of domain {self.domid} saved: {vgpu.size} bytes")
            return ""
        return work

    def restore(self) -> Work:
        domain = self._domain()
        fd = self.stream_fd
        assert fd is not None
        if domain.state != "building":
            raise ValueError(f"domain {self.domid} is {domain.state}; restore needs a new domain")

        def work() -> str:
            vgpu = domain.vgpu_memory()
            reader = Reader(fd)
            try:
                stream.parse_header(reader.read(stream.HEADER_SIZE, "vGPU header"), vgpu.size)
                while True:
                    offset, length, kind = stream.parse_chunk(reader.read(stream.CHUNK_SIZE, "vGPU chunk"),
                                                              vgpu.size)
                    if kind == stream.KIND_END:
                        break
                    reader.readinto(memoryview(vgpu[offset:offset + length]), "vGPU data")  # type: ignore[arg-type]
            except Truncated as e:
                raise stream.VgpuStreamError(str(e)) from None
            vgpu.flush()
            self.log.info(f"vGPU of domain {self.domid} restored: {vgpu.size} bytes")
            return ""
        return work


def run(argv: list[str]) -> int:
    try:
        args = parse(PROG, argv, OPTIONS)
        if args["mode"] != "listen":
            raise UsageError(f"{PROG}: only -mode listen is supported")
    except UsageError as e:
        print(e, file=sys.stderr)
        return 1
    log = Log(f"{PROG}[{args['domid']}]", 2, debug=bool(args["debug"]))
    host = Host()
    try:
        return VgpuServer(host, args["domid"], host.run_dir / f"vgpu-control-{args['domid']}", log=log).run()
    except (DomainError, OSError) as e:
        log.error(str(e))
        return 2


def main() -> None:
    exit_now(run(sys.argv[1:]))


