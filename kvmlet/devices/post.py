"""Port 0x80, the POST diagnostic port: a sink that remembers what the guest wrote.

Firmware writes progress codes here and Linux writes to it as an I/O delay (`outb` to 0x80 in
its boot code and in `native_io_delay`); nothing reads it back. On a PC a read of this port
reaches no device and returns all ones, which is what a read returns here. Keeping the write
count and the last code costs nothing and tells a developer how far early code got.
"""

from __future__ import annotations

REGION_SIZE = 1
POST_PORT = 0x80


class PostCodeSink:
    """Counts writes to the POST port and keeps the last code written."""

    def __init__(self) -> None:
        self.writes = 0
        self.last_code: int | None = None

    def save_state(self) -> dict[str, object]:
        """The last code (the count of writes is the process's statistics)."""
        return {"last_code": self.last_code}

    def load_state(self, state: dict) -> None:
        code = state["last_code"]
        self.last_code = None if code is None else code & 0xFF

    def read(self, offset: int, size: int) -> int:
        return (1 << (8 * size)) - 1 if 1 <= size <= 8 else 0xFF

    def write(self, offset: int, size: int, value: int) -> None:
        self.writes += 1
        self.last_code = value & 0xFF
