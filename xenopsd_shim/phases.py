"""Where a migration's time went, from trace points on the source: the summary's "phases".

The four phases tile the whole migration (they add up to total_seconds), so a benchmark can
tell the methods' data rate from the fixed costs that every method pays alike:

    handshake  connections, points 1 and 1-mem; after point 4 the statistics and the closing
    start_up   emu-manager and xenguest start, until xenguest's first page (its prepare:)
    data       first page to xenguest's END (emu-manager's result): every pre-copy pass
    tail       result to point 4: emu-manager's exit, End_of_image, the destination's last
               restore and its emulators' exit, the VM started there (and --verify, if asked)
"""
from __future__ import annotations

PHASES = ("handshake", "start_up", "data", "tail")


def phases(start: float, opened: float | None, first_page: float | None, last_page: float | None,
           running: float | None, done: float) -> dict[str, float] | None:
    """Seconds per phase from monotonic trace points; None when one is missing (a migration
    completed by asking the destination after a lost confirmation)."""
    if None in (opened, first_page, last_page, running):
        return None
    assert opened is not None and first_page is not None and last_page is not None and running is not None
    spans = {"handshake": (opened - start) + (done - running), "start_up": first_page - opened,
             "data": last_page - first_page, "tail": running - last_page}
    return {name: round(spans[name], 3) for name in PHASES}
