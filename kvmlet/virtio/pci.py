"""virtio-pci, modern (virtio 1.2 §4.1): any `VirtioDevice` as a PCI function.

`VirtioPci` is a `PciDevice` (vendor 0x1AF4, device 0x1040 + virtio id, revision 1) with one
memory BAR laid out as `pci_layout` describes, the vendor capabilities that point into it, the
PCI configuration access window and an MSI-X capability with one vector per queue plus one for
configuration changes (or the device's `msix_vectors`, fewer, which a driver then shares). The
BAR is a container of named I/O regions (common, ISR, device, notify, MSI-X table, PBA), so the
bus moves all of them, and every doorbell, with the BAR.

Interrupts: with MSI-X enabled, a queue or configuration interrupt signals the vector the driver
chose for it (nothing for VIRTIO_MSI_NO_VECTOR), through the injected `MsiController`; otherwise
it sets the ISR bit and raises the level-triggered INTx `IrqLine` until the driver reads ISR.
The transport never touches KVM. A queue whose interrupt a backend signals on an eventfd
(`VirtioDevice.call_eventfd`, vhost) has that eventfd attached to its vector while the vector
can fire (MSI-X on, neither function nor entry masked), so the backend interrupts the guest
with no Python step; otherwise the device relays it, which keeps the pending bit and ISR right.
`_route_calls` re-decides after every change of a queue's vector or of a mask.

Locks: the header lock (`PciDevice.lock`) guards ISR and the INTx line and never waits for
another lock of this device; the configuration window performs its BAR access outside it. The
call-routing lock serialises `_route_calls`, which runs with neither the header nor the MSI-X
lock held (a relay from a switch takes them).
"""

from __future__ import annotations

import threading

from kvmlet.bus import AccessSizes, ContainerRegion, IoRegion
from kvmlet.bus.access import read_region, write_region
from kvmlet.bus.pci import config_space as cfg
from kvmlet.bus.pci.device import BarKind, PciDevice
from kvmlet.bus.pci.msi import NO_VECTOR, MsiController, Msix
from kvmlet.devices.irq import IrqLine
from kvmlet.errors import LazyLogger
from kvmlet.virtio import pci_layout as layout
from kvmlet.virtio.device import InterruptKind, RingPart, VirtioDevice

log = LazyLogger(__name__)

_RING_FIELDS = {
    layout.QUEUE_DESC: RingPart.DESCRIPTOR,
    layout.QUEUE_DRIVER: RingPart.DRIVER,
    layout.QUEUE_DEVICE: RingPart.DEVICE,
}
_REGISTERS = AccessSizes(1, 4)
_MSIX_VALID = AccessSizes(4, 8)
_MSIX_IMPL = AccessSizes(4, 4)
"""The MSI-X table and PBA take dword and qword accesses (PCI 3.0 §6.8.2)."""


class _Handlers:
    """Bus ops made of a read and a write function (one pair per part of the BAR)."""

    def __init__(self, read, write):
        self.read = read
        self.write = write


class VirtioPci(PciDevice):
    """A virtio device behind the modern virtio-pci transport."""

    def __init__(
        self,
        device: VirtioDevice,
        msi: MsiController,
        irq: IrqLine,
        bar_index: int = 0,
        bar_kind: BarKind = BarKind.MEM64,
    ):
        if not 0 < device.queue_count <= layout.MAX_QUEUES:
            raise ValueError(f"{device.name}: {device.queue_count} queues do not fit virtio-pci")
        if device.config_size > layout.PAGE:
            raise ValueError(f"{device.name}: {device.config_size}-byte config is too large")
        pci_id = layout.VIRTIO_PCI_DEVICE_ID_BASE + device.device_id
        super().__init__(
            f"{device.name}-pci",
            layout.VIRTIO_PCI_VENDOR_ID,
            pci_id,
            layout.class_code(device.device_id),
            revision=layout.VIRTIO_PCI_REVISION,
            subsystem_vendor_id=layout.VIRTIO_PCI_VENDOR_ID,
            subsystem_id=pci_id,
            interrupt_pin=1,
        )
        self.device = device
        self.irq = irq
        self.bar_index = bar_index
        self.isr = 0
        self.intx_asserted = False
        self.config_vector = NO_VECTOR
        self.queue_vectors = [NO_VECTOR] * device.queue_count
        self._device_feature_select = 0
        self._driver_feature_select = 0
        self._queue_select = 0
        self.msix = Msix(msi, device.msix_vectors or device.queue_count + 1)
        calls = ((index, device.call_eventfd(index)) for index in range(device.queue_count))
        self._calls = [(index, call) for index, call in calls if call is not None]
        self._calls_lock = threading.Lock()
        self.bar_region = ContainerRegion(self.name, layout.BAR_SIZE)
        self.parts: list[IoRegion] = []
        self.common_region = self._add_part(
            "common",
            layout.COMMON_OFFSET,
            layout.COMMON_SIZE,
            self._common_read,
            self._common_write,
        )
        self.isr_region = self._add_part(
            "isr", layout.ISR_OFFSET, layout.ISR_SIZE, self._isr_read, self._ignore_write
        )
        self.device_region = None
        if device.config_size:
            self.device_region = self._add_part(
                "device",
                layout.DEVICE_OFFSET,
                device.config_size,
                self._device_config_read,
                self._device_config_write,
            )
        self.notify_region = self._add_part(
            "notify",
            layout.NOTIFY_OFFSET,
            layout.NOTIFY_OFF_MULTIPLIER * device.queue_count,
            self._read_zero,
            self._notify_write,
        )
        self._add_part(
            "msix-table",
            layout.MSIX_TABLE_OFFSET,
            self.msix.table_size,
            self.msix.table_read,
            self._msix_table_write,
            valid=_MSIX_VALID,
            impl=_MSIX_IMPL,
        )
        self._add_part(
            "msix-pba",
            layout.MSIX_PBA_OFFSET,
            self.msix.pba_size,
            self.msix.pba_read,
            self.msix.pba_write,
            valid=_MSIX_VALID,
            impl=_MSIX_IMPL,
        )
        self.add_bar(bar_index, bar_kind, layout.BAR_SIZE, self.bar_region)
        self._add_capabilities()
        device.connect_interrupts(self._interrupt)

    def _add_part(
        self, part, offset, size, read, write, valid=_REGISTERS, impl=_REGISTERS
    ) -> IoRegion:
        region = IoRegion(
            f"{self.name}.{part}", size, _Handlers(read, write), valid=valid, impl=impl
        )
        self.bar_region.add_subregion(offset, region)
        self.parts.append(region)
        return region

    def _add_capabilities(self) -> None:
        bar = self.bar_index
        vendor = layout.VENDOR_CAPABILITY_ID
        self.add_capability(
            vendor,
            layout.virtio_capability(
                layout.COMMON_CFG, bar, layout.COMMON_OFFSET, layout.COMMON_SIZE
            ),
        )
        multiplier = layout.NOTIFY_OFF_MULTIPLIER.to_bytes(4, "little")
        self.add_capability(
            vendor,
            layout.virtio_capability(
                layout.NOTIFY_CFG, bar, layout.NOTIFY_OFFSET, self.notify_region.size, multiplier
            ),
        )
        self.add_capability(
            vendor, layout.virtio_capability(layout.ISR_CFG, bar, layout.ISR_OFFSET, 1)
        )
        if self.device_region is not None:
            self.add_capability(
                vendor,
                layout.virtio_capability(
                    layout.DEVICE_CFG, bar, layout.DEVICE_OFFSET, self.device_region.size
                ),
            )
        body, mask = layout.pci_cfg_capability()
        self.pci_cfg_offset = self.add_capability(vendor, body, mask)
        self.msix.add_capability(self, bar, layout.MSIX_TABLE_OFFSET, layout.MSIX_PBA_OFFSET)

    def add_doorbell(self, queue_index: int, eventfd: object) -> None:
        """Let KVM signal `eventfd` for notify writes of `queue_index` (no exit to Python);
        the notifier belongs to the notify region, so it follows the BAR wherever it goes."""
        if not 0 <= queue_index < self.device.queue_count:
            raise ValueError(f"{self.device.name} has no queue {queue_index}")
        offset = layout.NOTIFY_OFF_MULTIPLIER * queue_index
        self.notify_region.add_eventfd(offset, layout.NOTIFY_WIDTH, eventfd)

    # Snapshots ------------------------------------------------------------------------------

    def save_state(self) -> dict[str, object]:
        """The PCI header, MSI-X, the transport's registers and the device's own state."""
        with self.lock:
            registers = {
                "isr": self.isr,
                "intx_asserted": self.intx_asserted,
                "config_vector": self.config_vector,
                "queue_vectors": list(self.queue_vectors),
                "selects": [
                    self._device_feature_select,
                    self._driver_feature_select,
                    self._queue_select,
                ],
            }
        return {
            **super().save_state(),
            **registers,
            "msix": self.msix.save_state(),
            "device": self.device.save_state(),
        }

    def load_state(self, state: dict) -> None:
        """Header (BARs mapped where the guest put them), MSI-X (routes re-created), the
        registers, the device; INTx is driven again from ISR as the device left it."""
        super().load_state(state)
        self.msix.load_state(state["msix"])
        vectors = [int(vector) & 0xFFFF for vector in state["queue_vectors"]]
        if len(vectors) != self.device.queue_count:
            raise ValueError(f"{len(vectors)} queue vectors for {self.device.queue_count} queues")
        self.device.load_state(state["device"])
        with self.lock:
            self.config_vector = state["config_vector"] & 0xFFFF
            self.queue_vectors = vectors
            selects = state["selects"]
            self._device_feature_select, self._driver_feature_select, self._queue_select = (
                value & 0xFFFF_FFFF for value in selects
            )
            self.isr = state["isr"] & (layout.ISR_QUEUE | layout.ISR_CONFIG)
            self.intx_asserted = False
            self._update_intx()
        self._route_calls()  # a backend's calls bound to the restored vectors, or relayed

    # Interrupts -----------------------------------------------------------------------------

    def _interrupt(self, kind: InterruptKind, queue_index: int | None) -> None:
        if self.msix.enabled:
            if kind is InterruptKind.CONFIG:
                vector = self.config_vector
            else:
                vector = self.queue_vectors[queue_index or 0]
            if vector != NO_VECTOR:
                self.msix.signal(vector)
            return
        with self.lock:
            self.isr |= layout.ISR_CONFIG if kind is InterruptKind.CONFIG else layout.ISR_QUEUE
            self._update_intx()

    def _route_calls(self) -> None:
        """Attach each call eventfd to its queue's vector while that vector can fire, else hand
        it to the relay (see the module docstring); a no-op for a device without any."""
        if not self._calls:
            return
        with self._calls_lock:
            for index, call in self._calls:
                call.bind(self.msix.unmasked(self.queue_vectors[index]))

    def _msix_table_write(self, offset: int, size: int, value: int) -> None:
        self.msix.table_write(offset, size, value)
        self._route_calls()

    def _update_intx(self) -> None:
        """Drive INTx from ISR, the INTx-disable bit and MSI-X (header lock held)."""
        asserted = bool(self.isr) and not self.command & cfg.COMMAND_INTX_DISABLE
        asserted = asserted and not self.msix.enabled
        self.set_interrupt_status(bool(self.isr))
        if asserted != self.intx_asserted:
            self.intx_asserted = asserted
            self.irq.set_level(asserted)

    def command_changed(self, old: int, new: int) -> None:
        if (old ^ new) & cfg.COMMAND_INTX_DISABLE:
            self._update_intx()

    def _isr_read(self, offset: int, size: int) -> int:
        if offset != 0:
            return 0
        with self.lock:
            value, self.isr = self.isr, 0
            self._update_intx()
        return value

    # Common configuration -------------------------------------------------------------------

    def _common_read(self, offset: int, size: int) -> int:
        data = bytearray(size)
        cache: dict[int, bytes] = {}
        for index in range(size):
            field = layout.FIELD_OF_BYTE.get(offset + index)
            if field is None:
                continue
            if field not in cache:
                width = layout.COMMON_FIELDS[field]
                cache[field] = self._common_field(field).to_bytes(width, "little")
            data[index] = cache[field][offset + index - field]
        return int.from_bytes(data, "little")

    def _common_field(self, field: int) -> int:
        device, queue = self.device, self._queue_select
        valid_queue = queue < device.queue_count
        if field in _RING_FIELDS:
            return device.queue_address(queue, _RING_FIELDS[field])
        values = {
            layout.DEVICE_FEATURE_SELECT: self._device_feature_select,
            layout.DRIVER_FEATURE_SELECT: self._driver_feature_select,
            layout.CONFIG_MSIX_VECTOR: self.config_vector,
            layout.NUM_QUEUES: device.queue_count,
            layout.DEVICE_STATUS: device.status,
            layout.CONFIG_GENERATION: device.config_generation & 0xFF,
            layout.QUEUE_SELECT: queue,
            layout.QUEUE_NOTIFY_OFF: queue if valid_queue else 0,
        }
        if field in values:
            return values[field]
        if field == layout.DEVICE_FEATURE:
            return device.device_features_word(self._device_feature_select)
        if field == layout.DRIVER_FEATURE:
            select = self._driver_feature_select
            return device.driver_features >> (32 * select) & 0xFFFF_FFFF if select < 2 else 0
        if field == layout.QUEUE_SIZE:
            return device.queue_size(queue)
        if field == layout.QUEUE_MSIX_VECTOR:
            return self.queue_vectors[queue] if valid_queue else NO_VECTOR
        return int(device.queue_ready(queue))  # QUEUE_ENABLE

    def _common_write(self, offset: int, size: int, value: int) -> None:
        for field, part in _RING_FIELDS.items():
            if size == 4 and offset in (field, field + 4):
                shift = 8 * (offset - field)
                current = self.device.queue_address(self._queue_select, part)
                kept = current & ~(0xFFFF_FFFF << shift)
                self.device.set_queue_address(self._queue_select, part, kept | value << shift)
                return
        if layout.COMMON_FIELDS.get(offset) != size:
            log.debug("%s: ignored %d-byte common write at %#x", self.name, size, offset)
            return
        self._write_field(offset, value)

    def _write_field(self, field: int, value: int) -> None:
        device, queue = self.device, self._queue_select
        if field == layout.DEVICE_FEATURE_SELECT:
            self._device_feature_select = value
        elif field == layout.DRIVER_FEATURE_SELECT:
            self._driver_feature_select = value
        elif field == layout.DRIVER_FEATURE:
            device.write_driver_features_word(self._driver_feature_select, value)
        elif field == layout.CONFIG_MSIX_VECTOR:
            self.config_vector = self._checked_vector(value)
        elif field == layout.DEVICE_STATUS:
            self._write_status(value)
        elif field == layout.QUEUE_SELECT:
            self._queue_select = value
        elif field == layout.QUEUE_SIZE:
            device.set_queue_size(queue, value)
        elif field == layout.QUEUE_MSIX_VECTOR:
            if queue < device.queue_count:
                self.queue_vectors[queue] = self._checked_vector(value)
                self._route_calls()
        elif field == layout.QUEUE_ENABLE:
            if value & 1:
                device.set_queue_ready(queue, True)
        else:
            log.debug("%s: ignored write of %#x to read-only field %#x", self.name, value, field)

    def _checked_vector(self, vector: int) -> int:
        """A vector the table has, else NO_VECTOR (which the driver reads back as a refusal)."""
        return vector if vector < self.msix.vector_count else NO_VECTOR

    def _write_status(self, value: int) -> None:
        self.device.write_status(value)
        if value == 0:
            self._device_feature_select = self._driver_feature_select = 0
            self._queue_select = 0
            self.config_vector = NO_VECTOR
            self.queue_vectors = [NO_VECTOR] * self.device.queue_count
            self._route_calls()
            with self.lock:
                self.isr = 0
                self._update_intx()

    # Device configuration and notifications ----------------------------------------------------

    def _device_config_read(self, offset: int, size: int) -> int:
        return self.device.read_config(offset, size)

    def _device_config_write(self, offset: int, size: int, value: int) -> None:
        self.device.write_config(offset, size, value)

    def _notify_write(self, offset: int, size: int, value: int) -> None:
        """A kick that reached user space (no ioeventfd registered, or another width)."""
        if offset % layout.NOTIFY_OFF_MULTIPLIER == 0:
            self.device.notify(offset // layout.NOTIFY_OFF_MULTIPLIER)

    @staticmethod
    def _read_zero(offset: int, size: int) -> int:
        return 0

    @staticmethod
    def _ignore_write(offset: int, size: int, value: int) -> None:
        """Read-only register."""

    # The PCI configuration access window (VIRTIO_PCI_CAP_PCI_CFG) --------------------------------

    def _window_data_touched(self, offset: int, size: int) -> bool:
        data = self.pci_cfg_offset + 2 + layout.PCI_CFG_DATA
        return offset < data + 4 and data < offset + size

    def _window(self) -> tuple[IoRegion, int, int] | None:
        """(part, offset in part, length) the window selects, or None if it selects nothing."""
        body = self.pci_cfg_offset + 2
        bar = self.config.get(body + layout.PCI_CFG_BAR, 1)
        offset = self.config.get(body + layout.PCI_CFG_OFFSET, 4)
        length = self.config.get(body + layout.PCI_CFG_LENGTH, 4)
        if bar != self.bar_index or length not in (1, 2, 4) or offset % length:
            return None
        for part in self.parts:
            if part.offset <= offset and offset + length <= part.offset + part.size:
                return part, offset - part.offset, length
        return None

    def config_read(self, offset: int, size: int) -> int:
        if self._window_data_touched(offset, size):
            with self.lock:
                window = self._window()
            if window is not None:
                part, part_offset, length = window
                with part.lock:
                    value = read_region(part, part_offset, length)
                with self.lock:
                    data = self.pci_cfg_offset + 2 + layout.PCI_CFG_DATA
                    self.config.set(data, length, value)
        return super().config_read(offset, size)

    def config_write(self, offset: int, size: int, value: int) -> None:
        msix_was = self.msix.enabled, self.msix.function_masked
        super().config_write(offset, size, value)
        if self.msix.enabled != msix_was[0]:
            with self.lock:
                self._update_intx()
        if (self.msix.enabled, self.msix.function_masked) != msix_was:
            self._route_calls()
        if self._window_data_touched(offset, size):
            with self.lock:
                window = self._window()
                data = self.config.get(self.pci_cfg_offset + 2 + layout.PCI_CFG_DATA, 4)
            if window is not None:
                part, part_offset, length = window
                with part.lock:
                    write_region(part, part_offset, length, data & ((1 << (8 * length)) - 1))

    def stats(self) -> dict[str, object]:
        """The device's counters, plus how its interrupts and notifications travelled."""
        return {
            **self.device.stats(),
            "transport": "pci",
            "msix_enabled": self.msix.enabled,
            "msix_fired": list(self.msix.fired),
            "notify_exits": self.notify_region.writes,
        }
