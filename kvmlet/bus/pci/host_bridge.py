"""The PCI host bridge: configuration mechanism #1 at 0xCF8-0xCFF and device 00.0.

The guest writes a dword address (enable bit 31, bus, device, function, register) to 0xCF8 and
then reads or writes 1, 2 or 4 bytes at 0xCFC-0xCFF. Only bus 0 exists; other buses, a clear
enable bit and absent functions read all-ones. Byte and word accesses to 0xCF8-0xCFB do not
touch the address register (Linux's conf1 probe relies on that); they read all-ones.

BAR containers: "pci-io" and "pci-memory" lie beneath everything else (priority -1), so RAM,
legacy and in-kernel devices keep their addresses whatever a guest programs into a BAR. The
bridge forwards only its windows (given by the machine's layout; the whole space when none are
given): a BAR programmed outside them decodes nowhere, and each container ends where its last
window does.
"""

from __future__ import annotations

from collections.abc import Sequence

from kvmlet.bus.address_space import AddressSpace
from kvmlet.bus.pci.bus import PciBus
from kvmlet.bus.pci.device import PciDevice
from kvmlet.bus.region import AccessSizes, ContainerRegion, IoRegion

CONF1_PORT = 0xCF8
CONF1_ENABLE = 1 << 31
HOST_BRIDGE_CLASS = 0x060000
PCI_PRIORITY = -1


class HostBridgeDevice(PciDevice):
    """Device 00.0: the host bridge's own header (class 0x0600, an Intel 440FX identity)."""

    def __init__(self, vendor_id: int = 0x8086, device_id: int = 0x1237):
        super().__init__("host-bridge", vendor_id, device_id, HOST_BRIDGE_CLASS)


class Conf1:
    """Register handlers of the 8-byte conf1 window (address at +0, data at +4..+7)."""

    def __init__(self, bus: PciBus):
        self.bus = bus
        self.address = 0

    def _target(self, data_offset: int) -> tuple[int, int] | None:
        address = self.address
        if not address & CONF1_ENABLE or (address >> 16) & 0xFF != 0:
            return None
        return (address >> 8) & 0xFF, (address & 0xFC) + data_offset

    def read(self, offset: int, size: int) -> int:
        if offset == 0 and size == 4:
            return self.address
        target = self._target(offset - 4) if offset >= 4 else None
        if target is None:
            return (1 << (8 * size)) - 1
        return self.bus.config_read(target[0], target[1], size)

    def write(self, offset: int, size: int, value: int) -> None:
        if offset == 0 and size == 4:
            self.address = value & 0x80FF_FFFC
            return
        target = self._target(offset - 4) if offset >= 4 else None
        if target is not None:
            self.bus.config_write(target[0], target[1], size, value)


class PciHostBridge:
    """Wires a PCI bus into the port I/O and MMIO spaces, with the host bridge at 00.0."""

    def __init__(
        self,
        io_space: AddressSpace,
        mmio_space: AddressSpace,
        *,
        io_windows: Sequence[tuple[int, int]] | None = None,
        memory_windows: Sequence[tuple[int, int]] | None = None,
    ):
        """`io_windows`/`memory_windows`: the (base, size) ranges forwarded to the bus."""
        self.io_container = ContainerRegion("pci-io", _top(io_windows, io_space))
        self.memory_container = ContainerRegion("pci-memory", _top(memory_windows, mmio_space))
        self.bus = PciBus(
            self.io_container,
            self.memory_container,
            io_windows=io_windows,
            memory_windows=memory_windows,
        )
        self.device = HostBridgeDevice()
        self.bus.attach(self.device, slot=0)
        self.conf1 = Conf1(self.bus)
        self.conf1_region = IoRegion(
            "pci-conf1", 8, self.conf1, valid=AccessSizes(1, 4), impl=AccessSizes(1, 4)
        )
        with io_space.transaction():
            io_space.root.add_subregion(0, self.io_container, PCI_PRIORITY)
            mmio_space.root.add_subregion(0, self.memory_container, PCI_PRIORITY)
            io_space.root.add_subregion(CONF1_PORT, self.conf1_region)

    def attach(self, device: PciDevice, slot: int | None = None, function: int = 0) -> int:
        return self.bus.attach(device, slot, function)


def _top(windows: Sequence[tuple[int, int]] | None, space: AddressSpace) -> int:
    """Where a container holding `windows` must end: its last window's end, or the space's."""
    if windows is None:
        return space.size
    return max((base + size for base, size in windows), default=space.size)
