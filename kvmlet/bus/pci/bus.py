"""A PCI bus: 32 slots of 8 functions, configuration access routing, BAR containers.

Configuration reads of an empty slot or function return all-ones (which Linux takes as "no
device"). Attaching a function other than 0 marks function 0 multi-function, so the guest scans
the others. BARs are placed in `io_region` / `memory_region` at their bus address (both
containers start at bus address 0) with `bar_priority`.
"""

from __future__ import annotations

from kvmlet.bus.pci import config_space as cfg
from kvmlet.bus.pci.device import PciDevice
from kvmlet.bus.region import Region

SLOTS = 32
FUNCTIONS = 8


def devfn(slot: int, function: int) -> int:
    return (slot << 3) | function


class PciBus:
    """Bus 0 behind a host bridge."""

    def __init__(self, io_region: Region, memory_region: Region, bar_priority: int = 0):
        self.io_region = io_region
        self.memory_region = memory_region
        self.bar_priority = bar_priority
        self.functions: dict[int, PciDevice] = {}

    def attach(self, device: PciDevice, slot: int | None = None, function: int = 0) -> int:
        """Plug `device` in (first free slot if `slot` is None); returns its devfn."""
        if device.bus is not None:
            raise ValueError(f"{device.name} is already on a bus")
        if not 0 <= function < FUNCTIONS:
            raise ValueError(f"function {function} is not 0-7")
        if slot is None:
            free = [s for s in range(SLOTS) if devfn(s, function) not in self.functions]
            if not free:
                raise ValueError(f"no free PCI slot for {device.name}")
            slot = free[0]
        if not 0 <= slot < SLOTS:
            raise ValueError(f"slot {slot} is not 0-31")
        number = devfn(slot, function)
        if number in self.functions:
            raise ValueError(f"PCI {slot:02x}.{function} is taken")
        self.functions[number] = device
        device.bus = self
        self._update_multifunction(slot)
        device.update_mappings()
        return number

    def _update_multifunction(self, slot: int) -> None:
        first = self.functions.get(devfn(slot, 0))
        if first is None:
            return
        several = any(devfn(slot, f) in self.functions for f in range(1, FUNCTIONS))
        header = first.config.get(cfg.HEADER_TYPE, 1) & ~cfg.HEADER_TYPE_MULTIFUNCTION
        if several:
            header |= cfg.HEADER_TYPE_MULTIFUNCTION
        first.config.set(cfg.HEADER_TYPE, 1, header)

    def config_read(self, number: int, offset: int, size: int) -> int:
        device = self.functions.get(number)
        if device is None:
            return (1 << (8 * size)) - 1
        return device.config_read(offset, size)

    def config_write(self, number: int, offset: int, size: int, value: int) -> None:
        device = self.functions.get(number)
        if device is not None:
            device.config_write(offset, size, value)
