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

from .emus import Emu, find_executable
from .orchestrator import Orchestrator

PROG = "emu-manager"
OPTIONS = [
    Opt("controlinfd", "int"), Opt("controloutfd", "int"), Opt("debuglog", "str"), Opt("fd", "int"),
    Opt("domid", "int"), Opt("live", "bool"), Opt("dm", "str", repeat=True), Opt("mode", "str"),
    Opt("store_port", "int"), Opt("console_port", "int"), Opt("fork", "str"), Opt("mem_pnode", "int"),
    Opt("supports", "str"), Opt("compress", "bool"),
]
MODES = {"hvm_save": True, "save": True, "hvm_restore": False, "restore": False}
PV_MODES = ("save", "restore")
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
    """The table of emulators for this domain: xenguest always, plus each -dm."""
    domid = args["domid"]
    argv = [find_executable("xenguest"), "-debug", "-domid", str(domid), "-controloutfd", "2",
            "-controlinfd", "0", "-mode", "listen"]
    if args["compress"]:
        argv += ["-compress", "true"]
    xenguest = Emu("xenguest", argv, host.xenguest_socket(domid), args["fd"], decides_live=True)
    emus = [xenguest]
    for dm in args["dm"]:
        kind, colon, value = dm.partition(":")
        if kind in ("qemu", "xenguest") and not colon:
            continue      # qemu's state is saved by xenopsd itself; xenguest is always in the table
        if kind == "vgpu":
            if not value.isdigit():
                raise UsageError(f"{PROG}: -dm vgpu needs a stream fd: vgpu:FD")
            _fd_open(int(value), "vgpu fd")
            _check_stream(int(value), "vgpu")
            vgpu_argv = [find_executable("vgpu-emu"), "-domid", str(domid), "-mode", "listen"]
            emus.append(Emu("vgpu", vgpu_argv, host.run_dir / f"vgpu-control-{domid}", int(value)))
            continue
        # emum.c's parse_dm_arg knows only xenguest, vgpu and qemu (so not qemu_trad: "Bad dm arg")
        raise UsageError(f"{PROG}: Bad dm arg: '{kind}', '{value if colon else '(null)'}'")
    # xenguest's set_args, as emum.c builds them: the ports given (restore), pv for PV modes
    # (main), vgpu when a vGPU is migrated too (configure_emus).
    xenguest.set_args = {key: str(args[key]) for key in ("store_port", "console_port") if args[key] is not None}
    if args["mode"] in PV_MODES:
        xenguest.set_args["pv"] = "true"
    if len(emus) > 1:
        xenguest.set_args["vgpu"] = "true"
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
    sys.exit(run(sys.argv[1:]))
