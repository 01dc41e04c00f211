"""A domain's memory, its dirty log and its run control, shared by mmap.

Every process that touches a domain (the guest workload, xenguest, the
toolstack) maps the same three files. Writes by the workload and
peek-and-clean by a saver are serialised by one flock, and the workload
marks a page dirty *after* writing it under that lock, so a write is either
in the copy a saver takes after cleaning, or reported by the next clean.
"""
from __future__ import annotations

import fcntl
import mmap
import os
import weakref
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from .units import format_size

if TYPE_CHECKING:      # loaded on first mapping: emu-manager imports this module and maps nothing
    import numpy as np

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT

# Byte offsets in the control page.
CTL_PAUSED = 0
CTL_DYING = 1
CTL_SIZE = PAGE_SIZE


# One limit for every way a domain is made (vm-create, xenemu create, a received Xenops record),
# so no side accepts a size another refuses.
MAX_MEMORY = 64 << 30


def check_size(nbytes: object, what: str = "memory", *, optional: bool = False) -> int:
    """A memory (or vGPU) size in bytes, or ValueError: it may come from the wire."""
    if type(nbytes) is not int or nbytes % PAGE_SIZE or not (0 if optional else PAGE_SIZE) <= nbytes <= MAX_MEMORY:
        shown = repr(nbytes) if len(repr(nbytes)) <= 40 else repr(nbytes)[:37] + "..."
        if type(nbytes) is int and 0 < nbytes < 1 << 60:
            shown += f" bytes ({format_size(nbytes)})"
        raise ValueError(f"invalid {what} size {shown}: a multiple of {PAGE_SIZE} bytes, "
                         f"at most {format_size(MAX_MEMORY)}")
    return nbytes


def open_reserved(path: Path, size: int, create: bool) -> int:
    """An fd on a file of `size` bytes whose blocks are all allocated.

    A write through a mapping of a sparse file on a full filesystem is a SIGBUS that kills
    the writer; reserving the blocks turns it into ENOSPC here, before any byte is written.
    An existing sparse file (a domain made before this) is reserved on first open."""
    fd = os.open(path, os.O_RDWR | (os.O_CREAT if create else 0), 0o600)
    try:
        st = os.fstat(fd)
        if create:
            os.ftruncate(fd, size)
        elif st.st_size != size:
            raise OSError(f"{path}: size {st.st_size}, expected {size}")
        if create or st.st_blocks * 512 < size:
            try:
                os.posix_fallocate(fd, 0, size)
            except OSError as e:
                raise OSError(e.errno, e.strerror, str(path)) from None
    except BaseException:
        os.close(fd)
        raise
    return fd


def _map(path: Path, size: int, create: bool) -> tuple[mmap.mmap, np.ndarray]:
    import numpy as np

    fd = open_reserved(path, size, create)
    try:
        mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)
    return mm, np.frombuffer(mm, dtype=np.uint8)


def _write_flag(fd: int, offset: int, value: bool) -> None:
    """By write(2) under the domain's lock, not through the mapping: on a full disk a control
    page that was never written is ENOSPC here, where a store to the mapping is a SIGBUS."""
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        os.pwrite(fd, b"\x01" if value else b"\x00", offset)
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)


def mark_dying(directory: Path) -> None:
    """Tell a domain's workload to stop, without mapping (or reserving) any of its files:
    destroy must work on any domain, even a sparse one left by an older version on a full disk."""
    fd = os.open(directory / "ctl", os.O_RDWR)
    try:
        _write_flag(fd, CTL_DYING, True)
    finally:
        os.close(fd)


class GuestMemory:
    """Memory frames, a byte-per-pfn dirty log and the control page of one domain."""

    def __init__(self, directory: Path, memory_bytes: int, create: bool = False) -> None:
        self.npages = check_size(memory_bytes) // PAGE_SIZE
        self._mm_mem, flat = _map(directory / "memory", memory_bytes, create)
        self.pages = flat.reshape(self.npages, PAGE_SIZE)
        self._mm_dirty, self.dirty = _map(directory / "dirty", self.npages, create)
        self._mm_ctl, self.ctl = _map(directory / "ctl", CTL_SIZE, create)
        self._lock_fd = os.open(directory / "ctl", os.O_RDWR)
        self._memory_fd = os.open(directory / "memory", os.O_RDWR)
        # The mappings go when the object does; the fds must too, or a long-lived process
        # (`serve`) that drops a domain without close() keeps fds per domain for ever.
        self._close_lock_fd = weakref.finalize(self, os.close, self._lock_fd)
        self._close_memory_fd = weakref.finalize(self, os.close, self._memory_fd)

    def close(self) -> None:
        # numpy views pin the mmaps; drop them first.
        del self.pages, self.dirty, self.ctl
        for mm in (self._mm_mem, self._mm_dirty, self._mm_ctl):
            try:
                mm.close()
            except BufferError:
                pass  # an outstanding view elsewhere; the map goes with the process
        self._close_lock_fd()
        self._close_memory_fd()

    def write_run(self, pfn: int, frames: object) -> None:
        """Whole frames into consecutive pfns from `pfn`, by pwrite rather than through the mapping:
        the mapping's first touch of a page of the fallocated file has the kernel zero-fill it before
        it is overwritten (most of a restore's CPU); a whole-page write needs no zero-fill. The same
        page cache backs the mapping, so every mapper sees the data. Thread-safe."""
        view = memoryview(frames).cast("B")
        offset = pfn * PAGE_SIZE
        while view:
            n = os.pwrite(self._memory_fd, view, offset)
            view, offset = view[n:], offset + n

    @contextmanager
    def locked(self) -> Iterator[None]:
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    @property
    def paused(self) -> bool:
        return bool(self.ctl[CTL_PAUSED])

    def set_flag(self, offset: int, value: bool) -> None:
        _write_flag(self._lock_fd, offset, value)

    def peek_and_clean(self) -> np.ndarray:
        """The pfns written since the last clean, as a sorted uint64 array."""
        import numpy as np

        with self.locked():
            pfns = np.flatnonzero(self.dirty)
            self.dirty[pfns] = 0
        return pfns.astype(np.uint64)

    def dirty_count(self) -> int:
        import numpy as np

        return int(np.count_nonzero(self.dirty))

    def clean_all(self) -> None:
        with self.locked():
            self.dirty[:] = 0

    def page_digests(self) -> list[bytes]:
        """A 16-byte BLAKE2b digest of every page, for page-by-page comparison."""
        import hashlib

        view = memoryview(self._mm_mem)
        return [hashlib.blake2b(view[i * PAGE_SIZE:(i + 1) * PAGE_SIZE], digest_size=16).digest()
                for i in range(self.npages)]


def combine_digests(page_digests: list[bytes]) -> str:
    """One hex digest standing for every page, in pfn order."""
    import hashlib

    return hashlib.blake2b(b"".join(page_digests), digest_size=32).hexdigest()


def digest_report(mem: GuestMemory, pages: bool) -> str:
    """What `digest` commands print: one line per page (pfn, digest), or the combined digest."""
    digests = mem.page_digests()
    if pages:
        return "\n".join(f"{pfn:x} {d.hex()}" for pfn, d in enumerate(digests))
    return combine_digests(digests)


def memory_digest(mem: GuestMemory) -> str:
    """A digest of all of memory in one BLAKE2b pass (no loop per page), for checks that
    both sides compute the same way, such as --verify inside the migration's downtime."""
    import hashlib

    return hashlib.blake2b(memoryview(mem._mm_mem), digest_size=32).hexdigest()
