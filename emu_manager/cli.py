"""`emu-manager`: the real command line (getopt_long_only, single-dash long options).

Exit 0 success, 1 argument or initialisation error (nothing is sent on the
control pipe), 2 the operation failed or was aborted.
"""
from __future__ import annotations

import errno
import fcntl
import os
import stat
import sys

from xenemu import Host
from xenmig.control import LineChannel
from xenmig.log import Log
from xenmig.longopts import Opt, UsageError, parse
from xenmig.procwait import exit_now

from .emus import EMU_KINDS, DmArg, Emu, EmuKind, find_executable
from .orchestrator import Orchestrator

PROG = "emu-manager"
OPTIONS = [
    Opt("controlinfd", "int"), Opt("controloutfd", "int"), Opt("debuglog", "str"), Opt("fd", "int"),
    Opt("domid", "int"), Opt("live", "bool"), Opt("dm", "str", repeat=True), Opt("mode", "str"),
    Opt("store_port", "int"), Opt("console_port", "int"), Opt("fork", "str"), Opt("mem_pnode", "int"),
    Opt("supports", "str"), Opt("compress", "bool"),
    Opt("delta-cache", "int"),      # this project's extension: forwarded to xenguest (issue: delta encoding)
]
MODES = {"hvm_save": True, "save": True, "hvm_restore": False, "restore": False}
SUPPORTED_FEATURES = {"migration-v2"}


def _fd_open(fd: int, what: str) -> None:
    try:
        os.fstat(fd)
    except OSError:
        raise UsageError(f"{PROG}: {what} {fd} is not an open file descriptor") from None


def _check_stream(fd: int, emu: str) -> None:
    """emum.c's check_stream_fd: a stream fd that several writers could write at random offsets
    (a file opened for writing without O_APPEND) could corrupt the image, so it is refused.
    emum.c lets only sockets through unchecked; here pipes pass too (this project's toolstack
    hands emu-manager pipes for the legacy zstd method and in tests), so only regular files are
    checked."""
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        return
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    if (flags & os.O_ACCMODE) != os.O_RDONLY and not flags & os.O_APPEND:
        raise UsageError(f"{PROG}: Failed to validate stream {fd} for {emu}: {os.strerror(errno.ENOSTR)} "
                         f"(a file opened for writing without O_APPEND)")


def _emulators(args: dict, host: Host) -> list[Emu]:
    """The emulators to run for this domain, from the table: the ones always there, plus each -dm."""
    domid = args["domid"]

    def emulator(kind: EmuKind, stream_fd: int) -> Emu:
        assert kind.socket is not None
        return Emu(kind, kind.command(find_executable(kind.executable), args), kind.socket(host, domid), stream_fd)

    emus = [emulator(kind, args["fd"]) for kind in EMU_KINDS.values() if kind.always]
    for dm in args["dm"]:
        name, colon, value = dm.partition(":")
        kind = EMU_KINDS.get(name)
        # emum.c's parse_dm_arg knows only xenguest, vgpu and qemu (so not qemu_trad: "Bad dm arg")
        if kind is None or (kind.dm is DmArg.FLAG and colon):
            raise UsageError(f"{PROG}: Bad dm arg: '{name}', '{value if colon else '(null)'}'")
        if kind.dm is DmArg.FLAG:
            continue      # always in the table (xenguest), or run and saved by xenopsd itself (qemu)
        if not value.isdigit():
            raise UsageError(f"{PROG}: -dm {name} needs a stream fd: {name}:FD")
        _fd_open(int(value), f"{name} fd")
        _check_stream(int(value), name)
        emus.append(emulator(kind, int(value)))
    for emu in emus:
        if emu.kind.set_args is not None:
            emu.set_args = emu.kind.set_args(args, len(emus))
    return emus


def run(argv: list[str]) -> int:
    try:
        args = parse(PROG, argv, OPTIONS)
        if args["supports"] is not None:
            print("true" if args["supports"] in SUPPORTED_FEATURES else "false")
            return 0
        for required in ("controlinfd", "controloutfd", "domid", "mode", "fd"):
            if args[required] is None:
                raise UsageError(f"{PROG}: missing required option -{required}")
        if args["mode"] not in MODES:
            raise UsageError(f"{PROG}: unknown mode '{args['mode']}' (one of {', '.join(MODES)})")
        for name in ("controlinfd", "controloutfd", "fd"):
            _fd_open(args[name], name)
        _check_stream(args["fd"], "xenguest")
        if (args["delta-cache"] or 0) < 0:
            raise UsageError(f"{PROG}: -delta-cache must be a number of bytes, 0 or more, not {args['delta-cache']}")
        save = MODES[args["mode"]]
        emus = _emulators(args, Host())
    except UsageError as e:
        print(e, file=sys.stderr)
        return 1
    # emum.c: debug logging exactly when -debuglog is "true"; any other word is accepted and means off.
    log = Log(f"{PROG}[{args['domid']}]", 2, debug=args["debuglog"] == "true")
    orchestrator = Orchestrator(save=save, live=bool(args["live"]), emus=emus,
                                control=LineChannel(args["controlinfd"], args["controloutfd"]), log=log)
    return orchestrator.run()


def main() -> None:
    exit_now(run(sys.argv[1:]))
