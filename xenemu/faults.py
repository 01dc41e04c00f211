"""Hypercalls made to fail on purpose, to test what the toolstack does when Xen says no.

`XENEMU_FAULTS=hvm_setcontext` (comma-separated operation names) in a process's
environment makes that operation of the emulated hypervisor fail in that
process, as the hypercall would with EINVAL. Children inherit it, so setting it
on a receiving `serve` makes every restore on that host fail at its very end,
when xenguest loads the HVM context; `unpause` makes the toolstack's start of a
restored domain fail, after the source has committed.
"""
from __future__ import annotations

import os

FAULTS_ENV = "XENEMU_FAULTS"
HVM_SETCONTEXT = "hvm_setcontext"
UNPAUSE = "unpause"


def injected(op: str) -> bool:
    return op in os.environ.get(FAULTS_ENV, "").split(",")


def failure(domid: int, call: str) -> str:
    """The hypercall's error, as libxenctrl would report it."""
    return f"domain {domid}: {call} failed: Invalid argument (injected by {FAULTS_ENV})"
