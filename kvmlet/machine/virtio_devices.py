"""The machine's virtio devices (disks, console, entropy, balloon, NICs, and the vhost devices
of vhost_devices.py) on the chosen transport.

Device models know nothing of transports; this module creates them from the configuration and
puts each behind virtio-pci (a PCI function the guest finds by enumeration, MSI-X through
irqfd) or virtio-mmio (a register block announced on the kernel command line, a level ISA
interrupt). Either way every queue's doorbell is an ioeventfd a `QueueWorker` thread waits on:
a guest kick never exits to Python. Each device has a worker of its own (with helper threads
for a device that serves several requests at once), so one slow device never holds up another;
a pause holds every one of them.

Each device model and transport module is imported when the configuration asks for it, so a
boot without disks never loads virtio-blk, and one on PCI never loads virtio-mmio.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING

from kvmlet.boot.memory_map import VIRTIO_MMIO_DEVICE_SIZE, VIRTIO_MMIO_WINDOW
from kvmlet.errors import KvmletError, LazyLogger
from kvmlet.virtio.worker import Doorbell, QueueWorker, doorbell
from kvmlet.vstate.interrupts import IrqfdLine, KvmIrqLine

if TYPE_CHECKING:
    from kvmlet.machine.machine import Machine
    from kvmlet.machine.net_devices import NetDevices
    from kvmlet.machine.vhost_devices import VhostDevices
    from kvmlet.virtio.balloon import VirtioBalloon
    from kvmlet.virtio.console import VirtioConsole
    from kvmlet.virtio.device import VirtioDevice
    from kvmlet.virtio.mmio import VirtioMmio
    from kvmlet.virtio.pci import VirtioPci

MMIO_IRQS = (5, 6, 7, 9, 10, 11, 14, 15)
"""ISA lines free on kvmlet's PC (no LPT, floppy or IDE) for virtio-mmio devices."""
PCI_INTX_IRQS = tuple(range(16, 24))
"""IOAPIC pins above the ISA range, for PCI INTx (announced in the MP table)."""
MAX_PCI_DEVICES = 31
SLOTS_WITH_INTX = range(1, 32)
"""PCI slots whose INTA# route the MP table announces: all but the host bridge's."""


def intx_irq(slot: int) -> int:
    """The IOAPIC pin of INTA# of PCI slot `slot` (announced for every slot in the MP table,
    so a device hot-added later has its route)."""
    return PCI_INTX_IRQS[(slot - 1) % len(PCI_INTX_IRQS)]


WORKER_STOP_TIMEOUT = 5.0
"""Seconds `close` waits for each device's worker (a transfer stuck in host I/O holds it)."""

log = LazyLogger(__name__)


class VirtioDevices:
    """Creates, wires and runs the virtio devices of a machine."""

    def __init__(self, machine: Machine):
        config = machine.config
        memory = machine.memory
        self.devices: list[VirtioDevice] = []
        self.transports: list[VirtioPci | VirtioMmio] = []
        self.console: VirtioConsole | None = None
        self.balloon: VirtioBalloon | None = None
        self.nets: NetDevices | None = None
        self.vhost: VhostDevices | None = None
        self.workers: list[QueueWorker] = []
        self._doorbells: list[Doorbell] = []
        self._lines: list[IrqfdLine] = []
        self._parameters: list[str] = []
        self._started = False
        self.transport_kind = config.virtio_transport
        self.left_open = False
        try:
            if config.disks:
                from kvmlet.virtio.blk import VirtioBlock

                for disk in config.disks:
                    self.devices.append(VirtioBlock(memory, disk))
            if config.console == "virtio":
                from kvmlet.virtio.console import VirtioConsole

                self.console = VirtioConsole(memory, machine.console.output)
                self.devices.append(self.console)
            if config.rng:
                from kvmlet.virtio.rng import VirtioRng

                self.devices.append(VirtioRng(memory))
            if config.balloon:
                from kvmlet.virtio.balloon import VirtioBalloon

                self.balloon = VirtioBalloon(memory)
                self.devices.append(self.balloon)
            if config.shares:
                from kvmlet.machine.shares import share_devices

                self.devices.extend(share_devices(config.shares, memory))
            if config.nets:
                from kvmlet.machine.net_devices import NetDevices

                self.nets = NetDevices(memory, config.nets, config.name)
                self.devices.extend(self.nets.devices)
            if config.vhost_user_disks or config.filesystems or config.vsock_cid is not None:
                from kvmlet.machine.vhost_devices import VhostDevices

                self.vhost = VhostDevices(machine)
                self.devices.extend(self.vhost.devices)
            if config.virtio_transport == "pci":
                self._attach_pci(machine)
            else:
                self._attach_mmio(machine)
        except BaseException:
            self.close()
            raise

    def _attach_mmio(self, machine: Machine) -> None:
        from kvmlet.virtio.mmio import VirtioMmio

        if len(self.devices) > len(MMIO_IRQS):
            raise KvmletError(f"at most {len(MMIO_IRQS)} virtio-mmio devices are supported")
        with machine.mmio.transaction():
            for index, device in enumerate(self.devices):
                base = VIRTIO_MMIO_WINDOW.base + index * VIRTIO_MMIO_DEVICE_SIZE
                irq = MMIO_IRQS[index]
                transport = VirtioMmio(device, KvmIrqLine(machine.vm, irq))
                machine.mmio.root.add_subregion(base, transport.region)
                self._connect(device, transport, self._worker_for(device, index))
                self._parameters.append(transport.kernel_parameter(base, irq))
                self.transports.append(transport)

    def _attach_pci(self, machine: Machine) -> None:
        from kvmlet.virtio.pci import VirtioPci

        if len(self.devices) > MAX_PCI_DEVICES:
            raise KvmletError(f"at most {MAX_PCI_DEVICES} virtio-pci devices are supported")
        router = machine.interrupt_router()
        with machine.mmio.transaction():
            for index, device in enumerate(self.devices):
                slot = 1 + index
                irq = intx_irq(slot)
                line = IrqfdLine(machine.vm, irq, level=True)
                self._lines.append(line)
                worker = self._worker_for(device, index)
                worker.watch(line.resample_fd, line.resampled)
                transport = VirtioPci(device, router.controller(), line)
                transport.config.set(0x3C, 1, irq)  # interrupt line, as firmware would set it
                machine.pci.attach(transport, slot=slot)
                machine.bar_allocator.assign(transport)
                self._connect(device, transport, worker)
                self.transports.append(transport)

    def _worker_for(self, device: VirtioDevice, index: int) -> QueueWorker:
        """The device's own worker, with a thread per request it may serve at once."""
        worker = QueueWorker(f"{device.name}{index}", device.concurrency)
        self.workers.append(worker)
        return worker

    def _connect(
        self, device: VirtioDevice, transport: VirtioPci | VirtioMmio, worker: QueueWorker
    ) -> None:
        """The device's doorbells on its worker; a NIC's data path and a vhost device's
        backend queues wired their own way."""
        first = self.vhost.wire(device, transport, worker) if self.vhost is not None else 0
        nic = self.nets.nic_of(device) if self.nets is not None else None
        if nic is None:
            queues = range(first, device.queue_count)
        else:
            queues = self.nets.connect(nic, transport, worker)
        for queue in queues:
            bell = doorbell(device, queue)
            self._doorbells.append(bell)
            transport.add_doorbell(queue, bell.eventfd)
            worker.add(bell)

    def kernel_parameters(self) -> list[str]:
        """Command-line words announcing devices (virtio-mmio) to the guest kernel."""
        return list(self._parameters)

    def start(self) -> None:
        """Start the devices' workers."""
        self._started = True
        for worker in self.workers:
            worker.start()

    def pause(self, timeout: float) -> bool:
        """Hold every device's worker between two rounds, with no request in flight (see
        `QueueWorker.pause`), and take every vhost backend's rings back (`pause_backend`: it
        finishes what it took, then touches no guest RAM, and the queues say where it got
        to, which a snapshot saves); False when a device stayed busy for `timeout` seconds
        (then `resume()`)."""
        deadline = time.monotonic() + timeout
        # Ask them all first, so that they reach their safe points together.
        paused = [worker.pause(0) for worker in self.workers]
        for index, worker in enumerate(self.workers):
            if not paused[index]:
                paused[index] = worker.pause(max(0.0, deadline - time.monotonic()))
        if not all(paused):
            return False
        for device in self._vhost_backed():
            device.pause_backend()
        return True

    def resume(self) -> None:
        """Hand the backends their rings again, then let the workers go on."""
        for device in self._vhost_backed():
            device.resume_backend()
        for worker in self.workers:
            worker.resume()

    def _vhost_backed(self) -> list:
        """The devices whose rings a vhost backend runs (VhostDevice, imported only with one)."""
        return [device for device in self.devices if hasattr(device, "pause_backend")]

    def state_owners(self) -> dict[str, object]:
        """Each transport (which saves its device with it), named as in the statistics."""
        return {
            f"{transport.device.name}{index}": transport
            for index, transport in enumerate(self.transports)
        }

    def disks(self) -> list[dict[str, object]]:
        """Each disk's image flushed to stable storage and its identity (a snapshot's disks
        are the images themselves, as they are when it is taken)."""
        disks = []
        for device in self.devices:
            image = getattr(device, "image", None)
            if image is not None:
                image.flush()
                disks.append({"path": os.path.abspath(device.options.path), **image.identity()})
        return disks

    def describe(self) -> list[dict[str, object]]:
        """One entry per device: its name in the statistics, type, transport and address."""
        entries = []
        for index, transport in enumerate(self.transports):
            device = transport.device
            entry: dict[str, object] = {
                "name": f"{device.name}{index}",
                "type": device.name,
                "transport": self.transport_kind,
                "queues": device.queue_count,
            }
            if self.nets is not None:
                entry.update(self.nets.describe(device))
            if self.transport_kind == "pci":
                entry["pci_slot"] = 1 + index  # as _attach_pci places them
            else:
                entry["mmio_base"] = VIRTIO_MMIO_WINDOW.base + index * VIRTIO_MMIO_DEVICE_SIZE
            entries.append(entry)
        return entries

    def stats(self) -> dict[str, object]:
        stats: dict[str, object] = {"workers": {w.name: w.stats() for w in self.workers}}
        for index, transport in enumerate(self.transports):
            stats[f"{transport.device.name}{index}"] = transport.stats()
        return stats

    def close(self) -> bool:
        """Stop the workers, then release doorbells, lines and devices (the machine owns the
        MSI routes); False, with everything left open, when a worker is still running (stuck
        in host I/O): closing a descriptor it may still use could hand its number, and the
        guest's data or an interrupt, to another file."""
        if self._started:
            stopped = [worker.stop(WORKER_STOP_TIMEOUT) for worker in self.workers]
            if not all(stopped):
                if not self.left_open:
                    log.warning("virtio devices left open: a worker is still running")
                self.left_open = True
                return False
        if self.nets is not None:
            self.nets.stop_helpers()  # after the workers, before the devices
        for bell in self._doorbells:
            bell.close()
        for line in self._lines:
            line.close()
        for device in self.devices:
            device.close()
        if self.nets is not None:
            self.nets.close()  # the taps, which vhost-net held until its device closed
        if self.vhost is not None:
            self.vhost.close()
        self.left_open = False
        return True
