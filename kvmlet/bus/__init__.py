"""The I/O bus: a region tree rendered into a flat, sorted dispatch table; PCI.

Devices are `IoRegion`s placed in an `AddressSpace`'s tree (`space.root.add_subregion`); the
space renders the tree into a flat view and dispatches guest accesses with a bisect. See
docs/design.md ("The bus") for the rules.
"""

from kvmlet.bus.address_space import (
    MMIO_SIZE,
    PORT_IO_SIZE,
    AddressSpace,
    MemoryListener,
    TraceHook,
    mmio_space,
    port_io_space,
)
from kvmlet.bus.flat import FlatRange, FlatView, IoEventNotifier, MemorySection
from kvmlet.bus.listener import RecordingListener
from kvmlet.bus.region import (
    AccessSizes,
    ContainerRegion,
    DeviceOps,
    Endian,
    EventNotifier,
    IoRegion,
    RamRegion,
    Region,
)
from kvmlet.bus.transactions import transaction

__all__ = [
    "MMIO_SIZE",
    "PORT_IO_SIZE",
    "AccessSizes",
    "AddressSpace",
    "ContainerRegion",
    "DeviceOps",
    "Endian",
    "EventNotifier",
    "FlatRange",
    "FlatView",
    "IoEventNotifier",
    "IoRegion",
    "MemoryListener",
    "MemorySection",
    "RamRegion",
    "RecordingListener",
    "Region",
    "TraceHook",
    "mmio_space",
    "port_io_space",
    "transaction",
]
