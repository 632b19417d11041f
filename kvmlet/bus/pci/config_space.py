"""A PCI function's 256-byte configuration space with per-byte write rules.

Each byte has a writable mask (bits a guest write may change) and a write-1-to-clear mask
(bits a guest clears by writing 1, such as the status error bits). Everything else is read-only
to the guest; the device model itself sets any byte with the `set_*` methods. Out-of-range or
odd-width guest accesses read all-ones and are dropped: the guest controls them.
"""

from __future__ import annotations

CONFIG_SPACE_SIZE = 256

VENDOR_ID = 0x00
DEVICE_ID = 0x02
COMMAND = 0x04
STATUS = 0x06
REVISION_ID = 0x08
CLASS_PROG = 0x09
CLASS_DEVICE = 0x0A
CACHE_LINE_SIZE = 0x0C
LATENCY_TIMER = 0x0D
HEADER_TYPE = 0x0E
BAR0 = 0x10
BAR_COUNT = 6
SUBSYSTEM_VENDOR_ID = 0x2C
SUBSYSTEM_ID = 0x2E
ROM_ADDRESS = 0x30
CAPABILITY_LIST = 0x34
INTERRUPT_LINE = 0x3C
INTERRUPT_PIN = 0x3D

COMMAND_IO = 1 << 0
COMMAND_MEMORY = 1 << 1
COMMAND_BUS_MASTER = 1 << 2
COMMAND_PARITY = 1 << 6
COMMAND_SERR = 1 << 8
COMMAND_INTX_DISABLE = 1 << 10
COMMAND_WRITABLE = (
    COMMAND_IO
    | COMMAND_MEMORY
    | COMMAND_BUS_MASTER
    | COMMAND_PARITY
    | COMMAND_SERR
    | COMMAND_INTX_DISABLE
)

STATUS_INTERRUPT = 1 << 3
STATUS_CAPABILITIES = 1 << 4
STATUS_W1C = 0xF900
"""Parity, system error, master/target abort and data parity bits: write 1 to clear."""

HEADER_TYPE_MULTIFUNCTION = 0x80
FIRST_CAPABILITY = 0x40


class ConfigSpace:
    """The bytes of one function's configuration space and the rules for guest writes."""

    def __init__(self) -> None:
        self.data = bytearray(CONFIG_SPACE_SIZE)
        self.writable = bytearray(CONFIG_SPACE_SIZE)
        self.write_one_to_clear = bytearray(CONFIG_SPACE_SIZE)

    @staticmethod
    def in_range(offset: int, size: int) -> bool:
        return size in (1, 2, 4) and offset >= 0 and offset + size <= CONFIG_SPACE_SIZE

    def read(self, offset: int, size: int) -> int:
        """Guest read: little-endian bytes, or all-ones when out of range."""
        if not self.in_range(offset, size):
            return (1 << (8 * size)) - 1 if 0 < size <= 8 else 0
        return int.from_bytes(self.data[offset : offset + size], "little")

    def write(self, offset: int, size: int, value: int) -> bool:
        """Guest write through the masks; returns whether it was in range (else dropped)."""
        if not self.in_range(offset, size):
            return False
        for index in range(size):
            position = offset + index
            byte = (value >> (8 * index)) & 0xFF
            writable = self.writable[position]
            current = (self.data[position] & ~writable) | (byte & writable)
            self.data[position] = current & ~(byte & self.write_one_to_clear[position]) & 0xFF
        return True

    def get(self, offset: int, size: int) -> int:
        """Device-side read (little-endian)."""
        return int.from_bytes(self.data[offset : offset + size], "little")

    def set(self, offset: int, size: int, value: int) -> None:
        """Device-side write, ignoring the guest write masks."""
        self.data[offset : offset + size] = (value & ((1 << (8 * size)) - 1)).to_bytes(
            size, "little"
        )

    def set_bytes(self, offset: int, data: bytes) -> None:
        self.data[offset : offset + len(data)] = data

    def set_writable(self, offset: int, size: int, mask: int) -> None:
        """Bits of [offset, offset+size) that guest writes may change."""
        self.writable[offset : offset + size] = mask.to_bytes(size, "little")

    def set_writable_bytes(self, offset: int, mask: bytes) -> None:
        self.writable[offset : offset + len(mask)] = mask

    def set_write_one_to_clear(self, offset: int, size: int, mask: int) -> None:
        self.write_one_to_clear[offset : offset + size] = mask.to_bytes(size, "little")
