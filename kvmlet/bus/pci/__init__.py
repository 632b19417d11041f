"""PCI: configuration space, devices with BARs and capabilities, bus 0, host bridge (conf1),
and a BAR allocator for firmware-style pre-assignment."""

from kvmlet.bus.pci.allocator import BarAllocator, PciWindow
from kvmlet.bus.pci.bus import FUNCTIONS, SLOTS, PciBus, devfn
from kvmlet.bus.pci.config_space import ConfigSpace
from kvmlet.bus.pci.device import BarKind, CapabilityWriteHook, PciBar, PciCapability, PciDevice
from kvmlet.bus.pci.host_bridge import CONF1_PORT, Conf1, HostBridgeDevice, PciHostBridge

__all__ = [
    "CONF1_PORT",
    "FUNCTIONS",
    "SLOTS",
    "BarAllocator",
    "BarKind",
    "CapabilityWriteHook",
    "Conf1",
    "ConfigSpace",
    "HostBridgeDevice",
    "PciBar",
    "PciBus",
    "PciCapability",
    "PciDevice",
    "PciHostBridge",
    "PciWindow",
    "devfn",
]
