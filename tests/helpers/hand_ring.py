"""A split virtqueue laid out by hand in guest RAM, as a guest driver would write it, for tests
that drive a backend (the kernel's vhost) at the ring level without a VirtioDevice."""

from __future__ import annotations

import os
import struct
import time

from kvmlet.memory import GuestMemory
from kvmlet.vhost.frontend import VringAddresses

DESC_F_WRITE = 2
WAIT = 30.0
"""Seconds to wait for a backend (the test box emulates its CPU: generous)."""


class HandRing:
    """A split ring in guest RAM, written the way a guest driver would."""

    def __init__(self, memory: GuestMemory, base: int, size: int = 16):
        self.memory, self.size = memory, size
        self.descriptor, self.available, self.used = base, base + 0x400, base + 0x800
        memory.fill(base, 0x1000)
        self.posted = 0

    def addresses(self) -> VringAddresses:
        host = self.memory.host_address
        return VringAddresses(
            descriptor=host(self.descriptor, 16 * self.size),
            used=host(self.used, 6 + 8 * self.size),
            available=host(self.available, 6 + 2 * self.size),
        )

    def post(self, address: int, length: int, writable: bool) -> None:
        """Make one single-buffer chain available."""
        head = self.posted % self.size
        flags = DESC_F_WRITE if writable else 0
        self.memory.write(
            self.descriptor + 16 * head, struct.pack("<QIHH", address, length, flags, 0)
        )
        self.memory.write_u16(self.available + 4 + 2 * head, head)
        self.posted += 1
        self.memory.write_u16(self.available + 2, self.posted)

    def used_index(self) -> int:
        return self.memory.read_u16(self.used + 2)

    def used_length(self, slot: int) -> int:
        return self.memory.read_u32(self.used + 8 + 8 * slot)


def eventfd() -> int:
    return os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)


def wait_for(condition, what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)
