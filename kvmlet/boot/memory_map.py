"""The guest-physical address map of a kvmlet machine, derived from its RAM size.

Low RAM starts at 0 and runs up to the 32-bit MMIO hole (3 GiB); whatever does not fit below
the hole is placed from 4 GiB up. The hole holds the PCI BAR window, the virtio-mmio window, the
IOAPIC (0xFEC00000) and the local APIC (0xFEE00000). Below 1 MiB sit the boot structures the
loaders write (GDT, PVH start_info, zero page, setup_data, page tables, command line) and the
MP table in the BIOS area, which the e820 map reports as reserved.

`parse_size` turns the user's `-m` argument (`256M`, `1G`, `512` meaning MiB, as kvmtool does)
into bytes, with a one-line `KvmletError` for anything it cannot accept.
"""

from __future__ import annotations

import re
from enum import IntEnum
from typing import NamedTuple

from kvmlet.errors import KvmletError

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
PAGE_SIZE = 4 * KiB


class AddressRange(NamedTuple):
    """A half-open guest-physical (or I/O port) range [base, base + size)."""

    base: int
    size: int

    @property
    def end(self) -> int:
        """One past the last address of the range."""
        return self.base + self.size

    def contains(self, address: int, length: int = 1) -> bool:
        return self.base <= address and address + length <= self.end


# Boot structures below 1 MiB, written by the loaders (addresses the kernel reads at entry and
# copies away before it allocates memory; none overlaps another).
GDT_ADDRESS = 0x500
PVH_START_INFO_ADDRESS = 0x6000  # hvm_start_info, then its module list and memory map
PVH_START_INFO_AREA = AddressRange(PVH_START_INFO_ADDRESS, 0x1000)
# A multiboot kernel's information structure, memory map and module list (never beside PVH).
MULTIBOOT_INFO_AREA = PVH_START_INFO_AREA
ZERO_PAGE_ADDRESS = 0x7000  # struct boot_params, 4 KiB
SETUP_DATA_AREA = AddressRange(0x8000, 0x1000)  # the setup_data linked list
PAGE_TABLES_AREA = AddressRange(0x9000, 0x6000)  # PML4, PDPT and four page directories
CMDLINE_AREA = AddressRange(0x20000, 0x10000)  # the kernel command line (multiboot: all strings)

# Legacy areas the e820 map reports as reserved: EBDA, VGA window, option and system ROMs.
EBDA_START = 0x9FC00
HIGH_MEMORY_START = 0x100000  # 1 MiB
# The MP floating pointer and configuration table, in the system BIOS area Linux scans.
MP_TABLE_AREA = AddressRange(0xF0000, 0x10000)

# Where loaders put the kernel and the initrd.
BZIMAGE_LOAD_ADDRESS = HIGH_MEMORY_START
INITRD_ALIGNMENT = PAGE_SIZE
DEFAULT_INITRD_ADDR_MAX = 0x7FFF_FFFF  # for kernels without a setup header (ELF)

# The 32-bit MMIO hole and what lives in it.
MMIO_HOLE = AddressRange(0xC000_0000, 4 * GiB - 0xC000_0000)
PCI_MMIO_WINDOW = AddressRange(0xC000_0000, 0x3000_0000)  # 32-bit PCI BARs
VIRTIO_MMIO_WINDOW = AddressRange(0xF000_0000, 0x0100_0000)  # virtio-mmio devices, 4 KiB each
VIRTIO_MMIO_DEVICE_SIZE = 0x1000
IOAPIC_ADDRESS = 0xFEC0_0000
LAPIC_ADDRESS = 0xFEE0_0000
HIGH_RAM_START = 4 * GiB

# The port I/O space.
PORT_IO_END = 0x10000

# MMIO free for the user's own devices (DeviceConfig.mmio): after the virtio-mmio window.
DEVICE_MMIO_WINDOW = AddressRange(0xF100_0000, 0x0100_0000)

# I/O ports for PCI I/O BARs: above the legacy ISA devices and the PCI config ports (0xCF8).
PCI_IO_WINDOW = AddressRange(0x1000, 0xF000)

# What the PCI host bridge forwards to its bus (a BAR elsewhere decodes nowhere): below 4 GiB
# the MMIO hole up to the IOAPIC (the BAR window, then the virtio-mmio and device windows,
# whose own regions win where they are placed), and above RAM a 64-bit window up to 2**39, the
# physical address width of every x86-64 CPU KVM runs on.
PCI_MEMORY_WINDOW_32 = AddressRange(MMIO_HOLE.base, IOAPIC_ADDRESS - MMIO_HOLE.base)
PCI_MEMORY_64_END = 1 << 39
PCI_MEMORY_64_ALIGNMENT = GiB

# RAM sizes kvmlet accepts. 16 MiB is where x86-64 kernels load by default, so nothing smaller
# can boot; 256 GiB keeps the top of RAM within the 39 physical address bits of every x86-64
# CPU KVM runs on.
MIN_RAM_SIZE = 16 * MiB
MAX_RAM_SIZE = 256 * GiB


class E820Type(IntEnum):
    """Memory types of the e820 map (arch/x86/include/asm/e820/types.h)."""

    RAM = 1
    RESERVED = 2


class E820Entry(NamedTuple):
    """One e820 range, as written into the zero page or the PVH memory map."""

    address: int
    size: int
    type: E820Type

    @property
    def end(self) -> int:
        return self.address + self.size


class MemoryMap:
    """Where RAM lives for a given RAM size, and the e820 map that describes it."""

    __slots__ = ("ram_size",)

    def __init__(self, ram_size: int):
        if ram_size < MIN_RAM_SIZE or ram_size > MAX_RAM_SIZE:
            raise KvmletError(
                f"RAM size {format_size(ram_size)} is out of range "
                f"({format_size(MIN_RAM_SIZE)} to {format_size(MAX_RAM_SIZE)})"
            )
        if ram_size % PAGE_SIZE:
            raise KvmletError(f"RAM size {ram_size} bytes is not a multiple of 4 KiB")
        self.ram_size = ram_size

    def __repr__(self) -> str:
        return f"MemoryMap({format_size(self.ram_size)})"

    @property
    def low_ram_size(self) -> int:
        """Bytes of RAM from address 0 up to the MMIO hole."""
        return min(self.ram_size, MMIO_HOLE.base)

    @property
    def low_ram_end(self) -> int:
        """One past the last address of low RAM (at most the start of the MMIO hole)."""
        return self.low_ram_size

    @property
    def high_ram_size(self) -> int:
        """Bytes of RAM placed from 4 GiB up (0 when everything fits below the hole)."""
        return self.ram_size - self.low_ram_size

    def ram_banks(self) -> list[tuple[int, int]]:
        """(base, size) of each RAM bank, ready for `GuestMemory.anonymous`."""
        banks = [(0, self.low_ram_size)]
        if self.high_ram_size:
            banks.append((HIGH_RAM_START, self.high_ram_size))
        return banks

    def pci_memory_windows(self) -> list[AddressRange]:
        """The MMIO ranges the PCI host bridge forwards: the hole below 4 GiB up to the IOAPIC,
        and from the first GiB boundary above RAM (4 GiB at least) up to 2**39."""
        top_of_ram = max(HIGH_RAM_START, HIGH_RAM_START + self.high_ram_size)
        base_64 = -(-top_of_ram // PCI_MEMORY_64_ALIGNMENT) * PCI_MEMORY_64_ALIGNMENT
        return [PCI_MEMORY_WINDOW_32, AddressRange(base_64, PCI_MEMORY_64_END - base_64)]

    def e820(self) -> list[E820Entry]:
        """The e820 map: usable RAM, the reserved legacy area below 1 MiB, no MMIO hole."""
        entries = [
            E820Entry(0, EBDA_START, E820Type.RAM),
            E820Entry(EBDA_START, HIGH_MEMORY_START - EBDA_START, E820Type.RESERVED),
            E820Entry(HIGH_MEMORY_START, self.low_ram_end - HIGH_MEMORY_START, E820Type.RAM),
        ]
        if self.high_ram_size:
            entries.append(E820Entry(HIGH_RAM_START, self.high_ram_size, E820Type.RAM))
        return entries


_SIZE_PATTERN = re.compile(r"(\d{1,20})\s*(?:([kmgt])(?:i?b)?)?", re.IGNORECASE)
_UNITS = {"": MiB, "k": KiB, "m": MiB, "g": GiB, "t": 1 << 40}


def parse_size(text: str) -> int:
    """Parse a RAM size such as `256M`, `1G`, `2048K` or `512` (MiB) into bytes.

    Raises KvmletError for anything that is not a whole number with an optional K/M/G/T
    suffix, or that is outside the range of RAM sizes kvmlet can boot.
    """
    match = _SIZE_PATTERN.fullmatch(text.strip())
    if not match:
        raise KvmletError(f"cannot read RAM size {text!r}: use a number of MiB or e.g. 256M, 2G")
    size = int(match.group(1)) * _UNITS[(match.group(2) or "").lower()]
    MemoryMap(size)  # validates range and granularity
    return size


def format_size(size: int) -> str:
    """A short human-readable size (`256 MiB`, `1.5 GiB`, `4096 bytes`)."""
    for unit, name in ((1 << 40, "TiB"), (GiB, "GiB"), (MiB, "MiB"), (KiB, "KiB")):
        if size >= unit:
            return f"{size / unit:g} {name}"
    return f"{size} bytes"
