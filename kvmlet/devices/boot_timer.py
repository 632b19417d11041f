"""A boot-time marker port, like Firecracker's `--boot-timer` device.

The guest writes `BOOT_TIMER_MAGIC` to the port when it considers itself booted (an init script
can do it through /dev/port: `printf '\\173' | dd of=/dev/port bs=1 seek=1088 count=1`), and
the machine records the time since its process started. Boot benchmarks then need no console
parsing and can run with the console quiet. Other values are ignored; reads return all-ones.
"""

from __future__ import annotations

from collections.abc import Callable

REGION_SIZE = 1
BOOT_TIMER_PORT = 0x440
BOOT_TIMER_MAGIC = 123
"""The value Firecracker's boot timer also waits for."""


class BootTimer:
    """Calls `on_mark()` for each write of the magic value."""

    def __init__(self, on_mark: Callable[[], None]) -> None:
        self._on_mark = on_mark
        self.marks = 0

    def read(self, offset: int, size: int) -> int:
        return (1 << (8 * size)) - 1

    def write(self, offset: int, size: int, value: int) -> None:
        if value & 0xFF == BOOT_TIMER_MAGIC:
            self.marks += 1
            self._on_mark()
