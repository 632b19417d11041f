"""The monitor process as the host sees it: resident memory (in total and inside guest RAM) and
the time since it started.

The total is /proc/self/statm's resident set; the part in guest RAM is counted with mincore(2)
over the guest RAM mappings, one byte per page, a chunk at a time: a few hundred microseconds
for a 256 MiB guest, where walking /proc/self/smaps costs milliseconds.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import threading
import time
from collections.abc import Iterable

_CHUNK = 1 << 30
"""Bytes of a mapping asked about per mincore call (a 256 KiB answer)."""
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
_libc.mincore.restype = ctypes.c_int


_RESIDENT_BIT = bytes(byte & 1 for byte in range(256))
"""mincore defines only bit 0 of each byte: a translation table keeps just that bit."""


def resident_bytes(address: int, size: int) -> int:
    """How much of [address, address+size) (page-aligned) is backed by host memory; a part
    that is not mapped (any more) counts as not resident."""
    page = mmap.PAGESIZE
    vector = ctypes.create_string_buffer(-(-min(size, _CHUNK) // page))
    resident = 0
    for offset in range(0, size, _CHUNK):
        length = min(_CHUNK, size - offset)
        if _libc.mincore(address + offset, length, vector) == 0:
            pages = -(-length // page)
            resident += vector.raw[:pages].translate(_RESIDENT_BIT).count(1)
    return resident * page


def memory_usage(guest_ranges: Iterable[tuple[int, int]]) -> dict[str, int]:
    """This process's resident memory, the part of it in guest RAM (`guest_ranges`: host
    (address, size) pairs of mapped RAM), and the monitor's own: the difference."""
    with open("/proc/self/statm") as statm:
        total = int(statm.read().split()[1]) * mmap.PAGESIZE
    guest = sum(resident_bytes(address, size) for address, size in guest_ranges)
    return {
        "rss_bytes": total,
        "guest_ram_rss_bytes": guest,
        "monitor_rss_bytes": total - guest,
        "threads": threading.active_count(),
    }


def seconds_since_process_start() -> float:
    """Time since this process started (the kernel's start time has clock-tick resolution)."""
    with open("/proc/self/stat") as stat:
        start_ticks = int(stat.read().rsplit(")", 1)[1].split()[19])
    started = start_ticks / os.sysconf("SC_CLK_TCK")
    return time.clock_gettime(time.CLOCK_BOOTTIME) - started
