"""Logging for the C-like executables: one line per event on a chosen fd."""
from __future__ import annotations

import os
import sys


class Log:
    def __init__(self, prog: str, fd: int = 2, debug: bool = False) -> None:
        self.prog = prog
        self.fd = fd
        self.verbose = debug

    def _emit(self, text: str) -> None:
        line = f"{self.prog}: {text}\n".encode(errors="replace")
        try:
            os.write(self.fd, line)
        except OSError:
            sys.stderr.write(line.decode())

    def debug(self, text: str) -> None:
        if self.verbose:
            self._emit(text)

    def info(self, text: str) -> None:
        self._emit(text)

    def error(self, text: str) -> None:
        self._emit(f"error: {text}")
