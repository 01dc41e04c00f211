"""`xenguest`: the real option shape, for emu-manager (`-mode listen`) and for people.

    xenguest -debug -domid D -controloutfd 2 -controlinfd 0 -mode listen [-compress true] [-delta-cache BYTES]
    xenguest -mode save -domid D -fd N [-live] [-compress true] [-delta-cache BYTES]
    xenguest -mode restore -domid D -fd N
    xenguest -mode inspect -fd N                 (a stream or suspend image, described on stdout)
    xenguest -mode convert -fd IN -outfd OUT [-base FILE]
                                                 (compressed and delta records rewritten as upstream
                                                 PAGE_DATA; -base: a raw memory image for deltas whose
                                                 base the stream does not hold)

-delta-cache BYTES (ours): re-sent pages go as DELTA_PAGE_DATA against a cache of what was sent,
of at most BYTES (0, the default: no deltas), when the in-band encoder's mode is on or auto.
"""
from __future__ import annotations

import json
import sys

from xenemu import DomainError, Host

from xenmig.fdio import Truncated
from xenmig.log import Log
from xenmig.longopts import Opt, UsageError, parse
from xenmig.precopy import Aborted
from xenmig.procwait import exit_now

from .listen import Server

# The modes that copy pages, inspect or convert import numpy and the codecs (most of xenguest's start-up
# time) where they run: `-mode listen` prints Ready without them and loads them while emu-manager connects.

PROG = "xenguest"
# As the real xenguest's option table (parse_options): -live, -debug and -fork take no argument.
OPTIONS = [
    Opt("mode", required=True), Opt("domid", "int"), Opt("fd", "int"), Opt("outfd", "int"),
    Opt("live", "flag"), Opt("debug", "flag"), Opt("controlinfd", "int"), Opt("controloutfd", "int"),
    Opt("compress", "bool"), Opt("store_port", "int"), Opt("console_port", "int"), Opt("fork", "flag"),
    Opt("mem_pnode", "int"), Opt("delta-cache", "int"), Opt("base"),
]
DOMAIN_MODES = ("listen", "save", "hvm_save", "restore", "hvm_restore")
MODES = (*DOMAIN_MODES, "inspect", "convert")


def _save(host: Host, args: dict, log: Log) -> int:
    from .adaptive import AdaptivePages, mode_from_environment
    from .save import Saver, simple_precopy_policy

    domain = host.domain(args["domid"])
    if domain.state not in ("running", "paused"):
        raise DomainError(f"domain {domain.domid} is {domain.state}; nothing to save")
    saver = Saver(domain, args["fd"], live=bool(args["live"]), policy=simple_precopy_policy(),
                  suspend=domain.pause, encoder=AdaptivePages(mode_from_environment(bool(args["compress"])),
                                                              delta_cache=args["delta-cache"] or 0),
                  on_iteration=lambda figures: log.debug(f"pass {json.dumps(figures)}"))
    p = saver.run()
    log.info(f"saved domain {domain.domid}: iterations {len(p.history)}, pages {p.sent}, "
             f"bytes {p.wire_bytes}, per iteration {p.history}")
    return 0


def _restore(host: Host, args: dict, log: Log) -> int:
    from .restore import Restorer

    domain = host.domain(args["domid"])
    if domain.state != "building":
        raise DomainError(f"domain {domain.domid} is {domain.state}; restore needs a new domain")
    try:
        result = Restorer(domain, args["fd"]).run()
    except BaseException:
        domain.destroy()   # it never ran: nothing of the guest is lost
        raise
    domain.update(state="paused")
    log.info(f"restored domain {domain.domid}: pages {result.pages}, records {result.records}, "
             f"bytes {result.bytes_read}, store_mfn {result.store_mfn}, console_mfn {result.console_mfn}")
    return 0


def run(argv: list[str]) -> int:
    try:
        args = parse(PROG, argv, OPTIONS)
        if args["mode"] not in MODES:
            raise UsageError(f"{PROG}: unknown mode '{args['mode']}' (one of {', '.join(MODES)})")
        if args["mode"] in DOMAIN_MODES and args["domid"] is None:
            raise UsageError(f"{PROG}: missing required option -domid")
        if args["mode"] != "listen" and args["fd"] is None:
            raise UsageError(f"{PROG}: -mode {args['mode']} needs -fd")
        if args["mode"] == "convert" and args["outfd"] is None:
            raise UsageError(f"{PROG}: -mode convert needs -outfd")
        if args["delta-cache"] is not None and args["delta-cache"] < 0:
            raise UsageError(f"{PROG}: -delta-cache must be a size in bytes, 0 or more (not {args['delta-cache']})")
        if args["base"] is not None and args["mode"] != "convert":
            raise UsageError(f"{PROG}: -base is for -mode convert")
    except UsageError as e:
        print(e, file=sys.stderr)
        return 1
    log = Log(PROG if args["domid"] is None else f"{PROG}[{args['domid']}]",
              args["controloutfd"] if args["controloutfd"] is not None else 2, debug=bool(args["debug"]))
    try:
        if args["mode"] == "inspect":
            from . import inspect
            return inspect.run(args["fd"])
        if args["mode"] == "convert":
            from . import convert
            return convert.run(args["fd"], args["outfd"], args["base"])
        host = Host()
        if args["mode"] == "listen":
            return Server(host, args["domid"], compress=bool(args["compress"]), delta_cache=args["delta-cache"] or 0,
                          log=log).run()
        if args["mode"] in ("save", "hvm_save"):
            return _save(host, args, log)
        return _restore(host, args, log)
    except Truncated as e:
        log.error(f"invalid stream: {e}")
    except (DomainError, Aborted, ValueError) as e:
        log.error(str(e))
    except OSError as e:
        log.error(f"{e.strerror or e}" + (f": {e.filename}" if e.filename else ""))
    except KeyboardInterrupt:
        log.error("interrupted")
    except Exception as e:
        if not _is_stream_error(e):
            raise
        log.error(f"invalid stream: {e}")
    return 2


def _is_stream_error(e: Exception) -> bool:
    """A libxc.StreamError, checked without importing libxc (and numpy) when none was raised."""
    libxc = sys.modules.get("xenmig.libxc")
    return libxc is not None and isinstance(e, libxc.StreamError)


def main() -> None:
    exit_now(run(sys.argv[1:]))
