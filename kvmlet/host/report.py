"""What kvmlet prints for a person: one line per traced guest access, the counters dump."""

from __future__ import annotations

import sys
from typing import TextIO

from kvmlet.bus import TraceHook


def trace_printer(stream: TextIO | None = None) -> TraceHook:
    """A bus trace hook printing one line per guest access (`--debug-io`) to `stream`
    (default: whatever sys.stderr is when the access happens)."""

    def trace(
        space: str, address: int, size: int, is_write: bool, value: int, region: str | None
    ) -> None:
        direction = "W" if is_write else "R"
        where = region or "unassigned"
        line = f"[io] {space:<6} {direction} {address:#010x}/{size} = {value:#x} {where}\n"
        (stream or sys.stderr).write(line)

    return trace


def format_stats(stats: dict) -> str:
    """The statistics dump as indented JSON (stable keys, for people and scripts)."""
    import json  # only when someone asks for statistics, not on every boot

    return json.dumps(stats, indent=2, sort_keys=True, default=str) + "\n"
