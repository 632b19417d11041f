"""A PCI bus: 32 slots of 8 functions, configuration access routing, BAR containers.

Configuration reads of an empty slot or function return all-ones (which Linux takes as "no
device"). Attaching a function other than 0 marks function 0 multi-function, so the guest scans
the others. BARs are placed in `io_region` / `memory_region` at their bus address (both
containers start at bus address 0) with `bar_priority`, and only where the host bridge forwards:
a BAR the guest programs outside every window of its kind decodes nowhere, as on a PC whose host
bridge claims only its windows.
"""

from __future__ import annotations

from collections.abc import Sequence

from kvmlet.bus.pci import config_space as cfg
from kvmlet.bus.pci.device import PciDevice
from kvmlet.bus.region import Region

SLOTS = 32
FUNCTIONS = 8


def devfn(slot: int, function: int) -> int:
    return (slot << 3) | function


class PciBus:
    """Bus 0 behind a host bridge."""

    def __init__(
        self,
        io_region: Region,
        memory_region: Region,
        bar_priority: int = 0,
        *,
        io_windows: Sequence[tuple[int, int]] | None = None,
        memory_windows: Sequence[tuple[int, int]] | None = None,
    ):
        """`io_windows` and `memory_windows` are the (base, size) ranges the host bridge
        forwards to the bus; None forwards the whole of the region."""
        self.io_region = io_region
        self.memory_region = memory_region
        self.bar_priority = bar_priority
        self.io_windows = _ranges(io_windows, io_region)
        self.memory_windows = _ranges(memory_windows, memory_region)
        self.functions: dict[int, PciDevice] = {}

    def forwards(self, is_io: bool, address: int, size: int) -> bool:
        """Whether [address, address + size) lies inside one window of its kind."""
        end = address + size
        windows = self.io_windows if is_io else self.memory_windows
        return any(start <= address and end <= stop for start, stop in windows)

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


def _ranges(
    windows: Sequence[tuple[int, int]] | None, region: Region
) -> tuple[tuple[int, int], ...]:
    """(start, end) pairs of `windows`, or the whole of `region` when there are none."""
    if windows is None:
        return ((0, region.size),)
    for base, size in windows:
        if base < 0 or size <= 0 or base + size > region.size:
            raise ValueError(f"PCI window {base:#x}+{size:#x} does not fit in {region.name!r}")
    return tuple((base, base + size) for base, size in windows)
