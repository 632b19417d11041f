"""An isa-debug-exit style port: a test kernel ends the run with an exit status of its choice.

A write of V (any width the guest uses, 1 to 4 bytes) ends kvmlet with exit status
(V << 1) | 1, as QEMU's isa-debug-exit does: the status is odd whatever V is, so a test kernel's
verdict never looks like a clean shutdown (0). Exit statuses are 8 bits, so it is that value's
low byte. Reads return 0. `on_exit(value, status)` is the machine's stop.
"""

from __future__ import annotations

from collections.abc import Callable

REGION_SIZE = 4


def exit_status(value: int) -> int:
    """The process exit status a write of `value` asks for."""
    return ((value << 1) | 1) & 0xFF


class DebugExit:
    """The port's register: any write stops the machine with the status the value encodes."""

    def __init__(self, on_exit: Callable[[int, int], None]):
        self.on_exit = on_exit

    def read(self, offset: int, size: int) -> int:
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        self.on_exit(value, exit_status(value))
