"""The toolstack's log: a file in the host directory, and stderr when asked."""
from __future__ import annotations

import sys
import threading
import time
from pathlib import Path


class Logger:
    def __init__(self, path: Path | None, verbose: bool = False, tag: str = "xenopsd-shim") -> None:
        self.path = path
        self.verbose = verbose
        self.tag = tag
        self._lock = threading.Lock()

    def child(self, tag: str) -> "Logger":
        return Logger(self.path, self.verbose, tag)

    def _write(self, level: str, text: str, to_stderr: bool) -> None:
        line = f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {self.tag} {level}: {text}\n"
        with self._lock:
            if self.path is not None:
                try:
                    with open(self.path, "a") as f:
                        f.write(line)
                except OSError:
                    pass    # a full disk: the command (or `serve`) goes on, and says so itself
            if to_stderr:
                sys.stderr.write(line)
                sys.stderr.flush()

    def debug(self, text: str) -> None:
        self._write("debug", text, self.verbose)

    def info(self, text: str) -> None:
        self._write("info", text, self.verbose)

    def warning(self, text: str) -> None:
        self._write("warning", text, True)
