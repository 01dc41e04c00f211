"""Parsing of the sizes and rates people type (`256M`, `1GiB`, `50MB/s`)."""
from __future__ import annotations

import re

_UNITS = {
    "": 1, "b": 1,
    "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10,
    "m": 1 << 20, "mb": 1 << 20, "mib": 1 << 20,
    "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30,
    "t": 1 << 40, "tb": 1 << 40, "tib": 1 << 40,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(text: str) -> int:
    """Binary units throughout: a VM's `512M` is 512 MiB as in xe/xl."""
    m = _SIZE.match(text)
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"invalid size {text!r} (use e.g. 256M, 1G, 4096K)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def parse_rate(text: str) -> int:
    """A byte rate such as `50MB/s`; the `/s` is optional."""
    body = text[:-2] if text.lower().endswith("/s") else text
    try:
        return parse_size(body)
    except ValueError:
        raise ValueError(f"invalid rate {text!r} (use e.g. 50MB/s)") from None


def format_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError
