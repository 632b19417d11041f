"""Pre-assigning BAR addresses inside the windows the machine gives PCI, as firmware would.

Without firmware, nothing programs the BARs before Linux scans the bus; Linux keeps addresses
that are valid and inside the host bridge windows. The machine hands this allocator an I/O
window, a 32-bit MMIO window (the PCI hole below 4 GiB) and optionally a 64-bit one, then calls
`assign(device)` for each device: BARs are placed largest first, each aligned to its size, and
decoding is enabled.
"""

from __future__ import annotations

from kvmlet.bus.pci import config_space as cfg
from kvmlet.bus.pci.device import BarKind, PciDevice
from kvmlet.errors import KvmletError


class PciWindow:
    """A bump allocator over [base, base + size)."""

    def __init__(self, name: str, base: int, size: int):
        self.name = name
        self.base = base
        self.size = size
        self.next_free = base

    @property
    def end(self) -> int:
        return self.base + self.size

    def allocate(self, size: int) -> int:
        """A `size`-aligned block of `size` bytes; KvmletError when the window is full."""
        address = -(-self.next_free // size) * size
        if address + size > self.end:
            raise KvmletError(
                f"PCI {self.name} window {self.base:#x}-{self.end - 1:#x} has no room for a "
                f"{size:#x}-byte BAR"
            )
        self.next_free = address + size
        return address


class BarAllocator:
    """Assigns every BAR of a device from the I/O, 32-bit or 64-bit MMIO window."""

    def __init__(self, io: PciWindow, mmio32: PciWindow, mmio64: PciWindow | None = None) -> None:
        self.io = io
        self.mmio32 = mmio32
        self.mmio64 = mmio64

    def _window(self, kind: BarKind) -> PciWindow:
        if kind is BarKind.IO:
            return self.io
        if kind is BarKind.MEM64 and self.mmio64 is not None:
            return self.mmio64
        return self.mmio32

    def assign(self, device: PciDevice, enable: bool = True) -> dict[int, int]:
        """Program each BAR of `device`; returns {BAR index: address}."""
        bars = sorted((bar for bar in device.bars if bar is not None), key=lambda b: -b.size)
        assigned = {}
        for bar in bars:
            address = self._window(bar.kind).allocate(bar.size)
            device.program_bar(bar.index, address)
            assigned[bar.index] = address
        if enable and bars:
            bits = 0
            if any(bar.is_io for bar in bars):
                bits |= cfg.COMMAND_IO
            if any(not bar.is_io for bar in bars):
                bits |= cfg.COMMAND_MEMORY
            device.set_command_bits(bits)
        return assigned
