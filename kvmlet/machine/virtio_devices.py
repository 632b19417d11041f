"""The machine's virtio devices (disks, console, entropy) on the chosen transport.

Device models know nothing of transports; this module creates them from the configuration and
puts each behind virtio-mmio (a register block announced on the kernel command line) or
virtio-pci (a PCI function the guest finds by enumeration).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kvmlet.bus import IoRegion
from kvmlet.machine.memory_map import VIRTIO_MMIO_DEVICE_SIZE, VIRTIO_MMIO_WINDOW
from kvmlet.virtio.blk import DiskOptions, VirtioBlock
from kvmlet.virtio.console import VirtioConsole
from kvmlet.virtio.device import VirtioDevice
from kvmlet.virtio.mmio import VirtioMmio
from kvmlet.virtio.rng import VirtioRng

if TYPE_CHECKING:
    from kvmlet.machine.boot import PciInterrupt
    from kvmlet.machine.machine import Machine

MMIO_IRQS = (5, 6, 7, 9, 10, 11, 14, 15)
"""ISA lines free on kvmlet's PC (no LPT, floppy or IDE) for virtio-mmio devices."""


class VirtioDevices:
    """Creates and wires the virtio devices of a machine."""

    def __init__(self, machine: Machine):
        config = machine.config
        memory = machine.memory
        self.devices: list[VirtioDevice] = []
        self.console: VirtioConsole | None = None
        self._parameters: list[str] = []
        try:
            for disk in config.disks:
                options = DiskOptions(str(disk.path), disk.read_only, disk.direct)
                self.devices.append(VirtioBlock(memory, options))
            if config.console == "virtio":
                self.console = VirtioConsole(memory, machine.console.output)
                self.devices.append(self.console)
            if config.rng:
                self.devices.append(VirtioRng(memory))
        except BaseException:
            self.close()
            raise
        self._attach_mmio(machine)

    def _attach_mmio(self, machine: Machine) -> None:
        from kvmlet.machine.machine import KvmIrqLine

        if len(self.devices) > len(MMIO_IRQS):
            from kvmlet.errors import KvmletError

            raise KvmletError(f"at most {len(MMIO_IRQS)} virtio-mmio devices are supported")
        with machine.mmio.transaction():
            for index, device in enumerate(self.devices):
                base = VIRTIO_MMIO_WINDOW.base + index * VIRTIO_MMIO_DEVICE_SIZE
                irq = MMIO_IRQS[index]
                transport = VirtioMmio(device, KvmIrqLine(machine.vm, irq))
                region: IoRegion = transport.region
                machine.mmio.root.add_subregion(base, region)
                self._parameters.append(transport.kernel_parameter(base, irq))

    def kernel_parameters(self) -> list[str]:
        """Command-line words announcing devices (virtio-mmio) to the guest kernel."""
        return list(self._parameters)

    def pci_interrupts(self) -> list[PciInterrupt]:
        """PCI INTx routes for the MP table (none on virtio-mmio)."""
        return []

    def start(self) -> None:
        """Start the doorbell workers."""

    def stats(self) -> dict[str, object]:
        return {
            f"{device.name}{index}": device.stats() for index, device in enumerate(self.devices)
        }

    def close(self) -> None:
        for device in self.devices:
            device.close()
