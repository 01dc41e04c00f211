"""An emulated Xen host: a directory holding its domains and run files.

Two hosts on one machine are two directories; every executable finds its
host through `XENEMU_ROOT`, as a real process finds its hypervisor.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import shutil
import uuid as uuidlib
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .domain import Domain, DomainError
from .memory import check_size
from .units import format_size

ROOT_ENV = "XENEMU_ROOT"
MAX_SOCKET_PATH = 107       # sun_path holds 108 bytes, the last a NUL
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def default_root() -> Path:
    env = os.environ.get(ROOT_ENV)
    if env:
        return Path(env)
    state = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(state) / "xenemu"


def check_name(name: str) -> str:
    """VM names end up in paths and logs: only a safe alphabet is accepted."""
    if not _NAME.match(name):
        raise DomainError(f"invalid VM name {name!r} (letters, digits, '.', '_', '-'; at most 64)")
    return name


class Host:
    def __init__(self, root: Path | str | None = None) -> None:
        self.root = Path(root) if root is not None else default_root()
        for sub in ("", "domains", "run"):
            (self.root / sub).mkdir(mode=0o700, parents=True, exist_ok=True)
        self.domains_dir = self.root / "domains"
        self.run_dir = self.root / "run"

    @contextmanager
    def _locked(self) -> Iterator[None]:
        fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _next_domid(self) -> int:
        counter = self.root / "next-domid"
        domid = int(counter.read_text()) if counter.exists() else 1
        counter.write_text(str(domid + 1))
        return domid

    def create_domain(self, name: str, memory_bytes: int, *, uuid: str | None = None,
                      meta: dict | None = None) -> Domain:
        """A new domain in state `building`: its space reserved (a full disk is one error now,
        never a SIGBUS later), not yet running."""
        check_name(name)
        check_size(memory_bytes)
        vgpu_bytes = check_size((meta or {}).get("vgpu_bytes") or 0, "vGPU", optional=True)
        with self._locked():
            for d in self.domains():
                if d.state == "dying":
                    continue
                if d.name == name and d.uuid != uuid:
                    raise DomainError(f"a VM named {name!r} already exists on this host")
                # One uuid runs once per host; only a migration to its own host makes a second
                # copy, which it destroys when done (or when it fails).
                if d.uuid == uuid and not d.outgoing:
                    raise DomainError(f"VM {uuid} already exists on this host, as domain {d.domid} "
                                      f"({d.name}, {d.state})")
            need, free = Domain.space_needed(memory_bytes, vgpu_bytes), shutil.disk_usage(self.domains_dir).free
            if need > free:
                raise DomainError(f"cannot create domain for VM {name!r}: {os.strerror(errno.ENOSPC)} "
                                  f"({format_size(need)} needed, {format_size(free)} free in {self.root})")
            made: Path | None = None
            try:
                domid = self._next_domid()
                directory = self.domains_dir / str(domid)
                directory.mkdir(mode=0o700)
                made = directory
                info = {"domid": domid, "uuid": uuid or str(uuidlib.uuid4()), "name": name,
                        "memory_bytes": memory_bytes, "state": "building", "workload": "none",
                        "workload_pid": None, **(meta or {})}
                Domain.initialise(directory, info)
            except BaseException as e:      # a cancelled create (SIGTERM, SIGINT) leaves nothing either
                if made is not None:
                    shutil.rmtree(made, ignore_errors=True)
                if isinstance(e, OSError):
                    raise DomainError(f"cannot create domain for VM {name!r}: {e.strerror or e}") from None
                raise
        return Domain(directory)

    def discard_unfinished(self) -> list[Path]:
        """Remove domain directories without meta.json: their creator was killed while it held
        the host lock (meta.json is written last, under it), so no command sees them, and their
        reserved space would stay taken for ever. What was removed, for the log."""
        with self._locked():
            gone = [d for d in self.domains_dir.iterdir() if d.name.isdigit() and not (d / "meta.json").exists()]
            for directory in gone:
                shutil.rmtree(directory, ignore_errors=True)
        return gone

    def domain(self, domid: int) -> Domain:
        directory = self.domains_dir / str(int(domid))
        if not (directory / "meta.json").exists():
            raise DomainError(f"no domain {domid} on host {self.root}")
        return Domain(directory)

    def domains(self) -> list[Domain]:
        found = []
        for directory in sorted(self.domains_dir.iterdir(), key=lambda p: int(p.name) if p.name.isdigit() else -1):
            if directory.name.isdigit() and (directory / "meta.json").exists():
                try:
                    found.append(Domain(directory))
                except (OSError, json.JSONDecodeError):
                    continue
        return found

    def find(self, ref: str) -> Domain:
        """A domain by name, uuid or domid, as `xl` accepts. A name or uuid wins over a domid,
        so the VM named "14" is never mistaken for domain 14; a number that names no VM is a domid."""
        live = [d for d in self.domains() if d.state != "dying"]
        found = next((d for d in live if ref in (d.name, d.uuid)), None) or \
            next((d for d in live if str(d.domid) == ref), None)
        if found is None:
            raise DomainError(f"no VM {ref!r} on host {self.root}")
        return found

    def xenguest_socket(self, domid: int) -> Path:
        return self._socket(f"xenguest-control-{domid}", "xenguest's control socket")

    def migration_socket(self, domid: int) -> Path:
        """Where a running `vm-migrate` of this domain takes commands (vm-compress)."""
        return self._socket(f"migration-control-{domid}", "the migration's control socket")

    def _socket(self, name: str, what: str) -> Path:
        path = self.run_dir / name
        if len(os.fsencode(path)) > MAX_SOCKET_PATH:
            raise DomainError(f"host directory {self.root} is too long a path: {what} "
                              f"{path} would exceed the {MAX_SOCKET_PATH}-byte limit of a Unix socket path")
        return path
