"""The monitor process as the host sees it: resident memory, in total and inside guest RAM."""

from __future__ import annotations

import threading
from collections.abc import Iterable


def memory_usage(guest_ranges: Iterable[tuple[int, int]]) -> dict[str, int]:
    """This process's resident memory (VmRSS) and the part of it in guest RAM (the Rss of
    the mappings inside `guest_ranges`, host (address, size) pairs), from /proc/self/smaps;
    `monitor_rss_bytes` is the difference: what the monitor itself holds."""
    ranges = list(guest_ranges)
    total = guest = 0
    inside = False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            if not line[0].isupper():  # a mapping's header: "start-end perms ..."
                start, _, end = line.split(maxsplit=1)[0].partition("-")
                low, high = int(start, 16), int(end, 16)
                inside = any(low < base + size and base < high for base, size in ranges)
            elif line.startswith("Rss:"):
                size = int(line.split()[1]) * 1024
                total += size
                if inside:
                    guest += size
    return {
        "rss_bytes": total,
        "guest_ram_rss_bytes": guest,
        "monitor_rss_bytes": total - guest,
        "threads": threading.active_count(),
    }
