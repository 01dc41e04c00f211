"""Reading a suspend image into a new domain: headers dispatched to emu-manager.

Used by `vm-resume` (from a file) and by the receiver (from a socket). The
domain is created from the Xenops record in state `building`; on any
failure it is destroyed, so a bad image never leaves a half-restored VM.
"""
from __future__ import annotations

import json
import re
from typing import Any, Callable

from xenemu import Domain, DomainError, Host, check_name
from xenemu.memory import check_size
from xenemu.workload import parse_spec
from xenmig import control as ctl
from xenmig import image, imagewalk
from xenmig.fdio import Reader, Truncated

from .accounting import CpuAccounting
from .emuctl import EmuManager, EmuManagerError
from .log import Logger

_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
STORE_PORT, CONSOLE_PORT = 1, 2


def valid_uuid(text: object) -> bool:
    return isinstance(text, str) and _UUID.match(text) is not None


def vm_of_record(rec: image.XenopsRecord, name_override: str | None = None) -> dict[str, Any]:
    """The VM the Xenops record describes: its vm_str must hold this project's metadata (see parse_vm_metadata).

    A record without vm_str (older xenopsd), or whose vm_str is a real
    xenopsd's VM sexp, is a valid image that this project cannot build a VM from."""
    if rec.vm_str is None:
        raise image.ImageError("the Xenops record has no vm_str: this project builds the VM from the metadata "
                               "it keeps there, so it cannot resume this image")
    return parse_vm_metadata(rec.vm_str.encode("latin-1"), name_override)


def parse_vm_metadata(raw: bytes, name_override: str | None = None,
                      what: str = "the Xenops record's vm_str") -> dict[str, Any]:
    """Validate the VM's metadata (JSON): it comes from the wire and names files and processes.
    `what` names where it came from (an image's record, or the vm connection's cookie)."""
    try:
        rec = json.loads(raw)
    except ValueError:
        raise image.ImageError(f"{what} is not this project's VM metadata (not JSON; "
                               "a real xenopsd's VM record?): cannot build the VM from it") from None
    except RecursionError:       # 1 MiB of "[" is valid framing
        raise image.ImageError(f"{what} is nested too deeply") from None
    if not isinstance(rec, dict):
        raise image.ImageError(f"{what} is not this project's VM metadata (not a JSON object)")
    name = name_override or rec.get("name")
    mem = rec.get("memory_bytes")
    if not isinstance(name, str):
        raise image.ImageError(f"{what} has no VM name")
    try:
        check_name(name)
    except DomainError as e:        # from the wire: a refusal of the image, as every field's
        raise image.ImageError(f"{what} has an {e}") from None
    if not valid_uuid(rec.get("uuid")):
        raise image.ImageError(f"{what} has an invalid uuid")
    vgpu = rec.get("vgpu_bytes", 0)
    try:
        check_size(mem)
        check_size(vgpu, "vGPU", optional=True)
    except ValueError as e:
        raise image.ImageError(f"{what} has an {e}") from None
    workload = rec.get("workload", "none")
    if not isinstance(workload, str):
        raise image.ImageError(f"{what} has an invalid workload")
    try:
        parse_spec(workload)
    except ValueError as e:
        raise image.ImageError(str(e)) from None
    return {"name": name, "uuid": rec["uuid"], "memory_bytes": mem, "workload": workload, "vgpu_bytes": vgpu}


class ImageReader:
    def __init__(self, host: Host, fd: int, *, log: Logger, name: str | None = None,
                 vgpu_fd: Callable[[], int] | None = None, uuid: str | None = None,
                 domain: Domain | None = None, cpu: CpuAccounting | None = None) -> None:
        """`uuid`: the VM the stream must carry (the one a request named), when it is known;
        `domain`: the one a migration created before the image (synchronisation point 1);
        `cpu`: where emu-manager's CPU and its emulators' go once it is reaped."""
        self.cpu = cpu
        self.created = domain
        self.host = host
        self.uuid = uuid
        self.reader = Reader(fd)
        self.fd = fd
        self.get_vgpu_fd = vgpu_fd
        self.vgpu_fd: int | None = None
        self.log = log
        self.name = name
        self.domain: Domain | None = None
        self.emu: EmuManager | None = None

    def run(self) -> Domain:
        """The restored domain, paused; on failure nothing is left."""
        try:
            return self._run()
        except Truncated as e:
            self._discard()
            raise image.ImageError(str(e)) from None
        except BaseException:
            self._discard()
            raise

    def _run(self) -> Domain:
        """The walk checks every header's rules (framing and place); each kind is handled here."""
        handlers: dict[image.Action, Callable[[imagewalk.Header], None]] = {
            image.Action.VM: self._vm, image.Action.XENGUEST: self._xenguest,
            image.Action.DEVICE_MODEL: self._device_model, image.Action.SKIP: self._skip}
        for header in imagewalk.walk(self.reader, restore=True, on_header=self._log_header):
            if header.action in handlers:
                handlers[header.action](header)
        assert self.emu is not None and self.domain is not None
        code = self.emu.finish()
        if code != 0:
            raise EmuManagerError(f"emu-manager exited with status {code}")
        if self.cpu is not None:
            self.emu.account(self.cpu)
        self.emu.close()
        self.emu = None
        self.domain.update(state="paused")
        return self.domain

    def _log_header(self, htype: int, length: int) -> None:
        self.log.debug(f"image header {image.name(htype)} length {length}")

    def _vm(self, header: imagewalk.Header) -> None:
        assert header.xenops is not None
        self._create(vm_of_record(header.xenops, self.name))

    def _xenguest(self, _: imagewalk.Header) -> None:
        self._restore_emulators()

    def _device_model(self, header: imagewalk.Header) -> None:
        assert self.domain is not None
        self.domain.set_context({"device_model": header.payload})

    def _skip(self, header: imagewalk.Header) -> None:
        """Varstored and swtpm state: read whole, as the real reader does, and dropped (no UEFI or vTPM here)."""
        self.log.info(f"{image.name(header.htype)} record of {header.length} bytes skipped: "
                      "no varstored or swtpm is emulated")

    def _create(self, rec: dict[str, Any]) -> None:
        if self.uuid is not None and rec["uuid"] != self.uuid:
            raise image.ImageError(f"the stream carries VM {rec['uuid']}, not VM {self.uuid} as its request says")
        extra = ["-store_port", str(STORE_PORT), "-console_port", str(CONSOLE_PORT)]
        if rec["vgpu_bytes"]:
            if self.get_vgpu_fd is None:
                raise image.ImageError("the VM has a vGPU but its stream has no fd here")
            self.vgpu_fd = self.get_vgpu_fd()
            extra += ["-dm", f"vgpu:{self.vgpu_fd}"]
        if self.created is not None:
            self.domain = self.created
        else:
            try:
                self.domain = self.host.create_domain(rec["name"], rec["memory_bytes"], uuid=rec["uuid"],
                                                      meta={"workload": rec["workload"],
                                                            "vgpu_bytes": rec["vgpu_bytes"]})
            except DomainError as e:
                raise image.ImageError(str(e)) from None
        self.emu = EmuManager(domid=self.domain.domid, mode="hvm_restore", fd=self.fd, extra=extra, log=self.log,
                              pass_fds=() if self.vgpu_fd is None else (self.vgpu_fd,))

    def _restore_emulators(self) -> None:
        """restore:xenguest, then (the vGPU's Demu header read from its fd) restore:vgpu; then both results.

        Both streams flow at once, as the sender writes them at once."""
        assert self.emu is not None and self.domain is not None
        self.emu.send(f"{ctl.MSG_RESTORE}xenguest")
        pending = {"xenguest"}
        vgpu = None if self.vgpu_fd is None else Reader(self.vgpu_fd)
        if vgpu is not None:
            htype, _ = image.parse_header(vgpu.read(image.HEADER_SIZE, "vGPU image header"))
            if htype != image.DEMU:
                raise image.ImageError(f"vGPU stream starts with {image.name(htype)}, not Demu")
            self.emu.send(f"{ctl.MSG_RESTORE}vgpu")
            pending.add("vgpu")
        while pending:
            line = self.emu.serve({}, until=lambda l: l.startswith(ctl.MSG_RESULT))
            fields = line[len(ctl.MSG_RESULT):].split()
            emu = fields[0] if fields else ""
            if emu not in pending:
                raise EmuManagerError(f"unexpected result from emu-manager: {line!r}")
            pending.discard(emu)
            if emu == "xenguest":
                if len(fields) != 3 or not all(f.isdigit() for f in fields[1:]):
                    raise EmuManagerError(f"malformed result from emu-manager: {line!r}")
                self.domain.update(store_mfn=int(fields[1]), console_mfn=int(fields[2]))
        if vgpu is not None:
            self._vgpu_footer(vgpu)

    @staticmethod
    def _vgpu_footer(vgpu: Reader) -> None:
        """The vGPU fd ends with End_of_image after the vGPU emulator's stream, as xenopsd writes it."""
        try:
            htype, _ = image.parse_header(vgpu.read(image.HEADER_SIZE, "vGPU stream footer"))
        except Truncated:
            raise image.ImageError("the vGPU stream ended without End_of_image after the vGPU state") from None
        if htype != image.END_OF_IMAGE:
            raise image.ImageError(f"the vGPU stream has {image.name(htype)} after the vGPU state, "
                                   "not End_of_image")

    def _discard(self) -> None:
        if self.emu is not None:
            self.emu.close()
            self.emu = None
        if self.domain is not None:
            self.domain.destroy()
            self.domain = None
