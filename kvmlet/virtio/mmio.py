"""virtio-mmio transport, version 2 (virtio 1.2 §4.2): a device's registers in a 512-byte block.

`VirtioMmio` is the bus ops object (`read`/`write` at region offsets) for one `VirtioDevice`:
it keeps the selector registers, translates the rest into calls on the device, and turns the
device's interrupts into InterruptStatus bits on a level-triggered `IrqLine`, lowered when the
driver acknowledges every pending bit. Control registers take 32-bit aligned accesses only
(others read 0 and are ignored); the device configuration at 0x100 takes 1, 2 and 4 bytes.
Linux finds the device through `kernel_parameter()`: `virtio_mmio.device=SIZE@BASE:IRQ`.
"""

from __future__ import annotations

import threading

from kvmlet.bus import AccessSizes, IoRegion
from kvmlet.devices.irq import IrqLine
from kvmlet.errors import LazyLogger
from kvmlet.virtio.device import InterruptKind, RingPart, VirtioDevice

log = LazyLogger(__name__)

MAGIC_VALUE = 0x000
VERSION = 0x004
DEVICE_ID = 0x008
VENDOR_ID = 0x00C
DEVICE_FEATURES = 0x010
DEVICE_FEATURES_SEL = 0x014
DRIVER_FEATURES = 0x020
DRIVER_FEATURES_SEL = 0x024
QUEUE_SEL = 0x030
QUEUE_NUM_MAX = 0x034
QUEUE_NUM = 0x038
QUEUE_READY = 0x044
QUEUE_NOTIFY = 0x050
INTERRUPT_STATUS = 0x060
INTERRUPT_ACK = 0x064
STATUS = 0x070
QUEUE_DESC_LOW = 0x080
QUEUE_DESC_HIGH = 0x084
QUEUE_DRIVER_LOW = 0x090
QUEUE_DRIVER_HIGH = 0x094
QUEUE_DEVICE_LOW = 0x0A0
QUEUE_DEVICE_HIGH = 0x0A4
SHM_SEL = 0x0AC
SHM_LEN_LOW = 0x0B0
SHM_LEN_HIGH = 0x0B4
SHM_BASE_LOW = 0x0B8
SHM_BASE_HIGH = 0x0BC
CONFIG_GENERATION = 0x0FC
CONFIG = 0x100

REGION_SIZE = 0x200
MAGIC = 0x74726976  # "virt"
MMIO_VERSION = 2
KVMLET_VENDOR_ID = int.from_bytes(b"kvml", "little")

INTERRUPT_USED_BUFFER = 1
INTERRUPT_CONFIG_CHANGE = 2

_RING_REGISTERS = {
    QUEUE_DESC_LOW: (RingPart.DESCRIPTOR, 0),
    QUEUE_DESC_HIGH: (RingPart.DESCRIPTOR, 32),
    QUEUE_DRIVER_LOW: (RingPart.DRIVER, 0),
    QUEUE_DRIVER_HIGH: (RingPart.DRIVER, 32),
    QUEUE_DEVICE_LOW: (RingPart.DEVICE, 0),
    QUEUE_DEVICE_HIGH: (RingPart.DEVICE, 32),
}
_NO_SHARED_MEMORY = (SHM_LEN_LOW, SHM_LEN_HIGH, SHM_BASE_LOW, SHM_BASE_HIGH)


class VirtioMmio:
    """The virtio-mmio register block of one device, with its interrupt line."""

    def __init__(self, device: VirtioDevice, irq: IrqLine):
        self.device = device
        self.irq = irq
        self.interrupt_status = 0
        self._interrupt_lock = threading.Lock()
        self._device_features_select = 0
        self._driver_features_select = 0
        self._queue_select = 0
        self.notify_exits = 0
        self.region = IoRegion(
            f"virtio-mmio-{device.name}",
            REGION_SIZE,
            ops=self,
            valid=AccessSizes(1, 4, unaligned=False),
            impl=AccessSizes(1, 4, unaligned=False),
        )
        device.connect_interrupts(self._interrupt)

    def add_doorbell(self, queue_index: int, eventfd: object) -> None:
        """Let KVM signal `eventfd` for QueueNotify writes of `queue_index` (no exit to Python);
        the worker that waits on it calls `device.notify(queue_index)`."""
        self.region.add_eventfd(QUEUE_NOTIFY, 4, eventfd, datamatch=queue_index)

    def stats(self) -> dict[str, object]:
        """The device's counters, plus how many queue notifications reached Python."""
        return {**self.device.stats(), "transport": "mmio", "notify_exits": self.notify_exits}

    def kernel_parameter(self, base: int, irq_number: int) -> str:
        """The command-line word announcing this device to Linux at `base` with `irq_number`."""
        return f"virtio_mmio.device={REGION_SIZE:#x}@{base:#x}:{irq_number}"

    # Snapshots -----------------------------------------------------------------------------------

    def save_state(self) -> dict[str, object]:
        """The transport's registers and the device's own state."""
        with self._interrupt_lock:
            interrupt_status = self.interrupt_status
        return {
            "interrupt_status": interrupt_status,
            "selects": [
                self._device_features_select,
                self._driver_features_select,
                self._queue_select,
            ],
            "device": self.device.save_state(),
        }

    def load_state(self, state: dict) -> None:
        """The device, then the registers; the interrupt line is raised again if an
        interrupt was pending (a level the interrupt controller's saved state has too)."""
        self.device.load_state(state["device"])
        self._device_features_select, self._driver_features_select, self._queue_select = (
            value & 0xFFFF_FFFF for value in state["selects"]
        )
        with self._interrupt_lock:
            self.interrupt_status = state["interrupt_status"] & (
                INTERRUPT_USED_BUFFER | INTERRUPT_CONFIG_CHANGE
            )
            if self.interrupt_status:
                self.irq.set_level(True)

    # Interrupts ----------------------------------------------------------------------------------

    def _interrupt(self, kind: InterruptKind, queue_index: int | None) -> None:
        bit = INTERRUPT_CONFIG_CHANGE if kind is InterruptKind.CONFIG else INTERRUPT_USED_BUFFER
        with self._interrupt_lock:
            self.interrupt_status |= bit
            self.irq.set_level(True)

    def _acknowledge(self, bits: int) -> None:
        with self._interrupt_lock:
            self.interrupt_status &= ~bits
            if self.interrupt_status == 0:
                self.irq.set_level(False)

    # Registers -----------------------------------------------------------------------------------

    def read(self, offset: int, size: int) -> int:
        if offset == INTERRUPT_STATUS and size == 4:  # read for every interrupt: first
            return self.interrupt_status
        if offset >= CONFIG:
            return self.device.read_config(offset - CONFIG, size)
        if size != 4:
            log.debug("%s: ignored %d-byte register read at %#x", self.region.name, size, offset)
            return 0
        return self._read_register(offset)

    def _read_register(self, offset: int) -> int:
        device, queue = self.device, self._queue_select
        if offset in _RING_REGISTERS:
            part, shift = _RING_REGISTERS[offset]
            return device.queue_address(queue, part) >> shift & 0xFFFF_FFFF
        if offset in _NO_SHARED_MEMORY:
            return 0xFFFF_FFFF
        simple = {
            MAGIC_VALUE: MAGIC,
            VERSION: MMIO_VERSION,
            DEVICE_ID: device.device_id,
            VENDOR_ID: KVMLET_VENDOR_ID,
            INTERRUPT_STATUS: self.interrupt_status,
            STATUS: device.status,
            CONFIG_GENERATION: device.config_generation,
        }
        if offset in simple:
            return simple[offset]
        if offset == DEVICE_FEATURES:
            return device.device_features_word(self._device_features_select)
        if offset == QUEUE_NUM_MAX:
            return device.queue_max_size(queue)
        if offset == QUEUE_READY:
            return int(device.queue_ready(queue))
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        if offset >= CONFIG:
            self.device.write_config(offset - CONFIG, size, value)
        elif size != 4:
            log.debug("%s: ignored %d-byte register write at %#x", self.region.name, size, offset)
        else:
            self._write_register(offset, value)

    def _write_register(self, offset: int, value: int) -> None:
        if offset == INTERRUPT_ACK:  # written for every interrupt: first
            self._acknowledge(value)
            return
        device, queue = self.device, self._queue_select
        if offset == QUEUE_NOTIFY:
            self.notify_exits += 1  # a doorbell with no ioeventfd behind it
            device.notify(value & 0xFFFF)
        elif offset in _RING_REGISTERS:
            part, shift = _RING_REGISTERS[offset]
            kept = device.queue_address(queue, part) & ~(0xFFFF_FFFF << shift)
            device.set_queue_address(queue, part, kept | value << shift)
        elif offset == DEVICE_FEATURES_SEL:
            self._device_features_select = value
        elif offset == DRIVER_FEATURES_SEL:
            self._driver_features_select = value
        elif offset == DRIVER_FEATURES:
            device.write_driver_features_word(self._driver_features_select, value)
        elif offset == QUEUE_SEL:
            self._queue_select = value
        elif offset == QUEUE_NUM:
            device.set_queue_size(queue, value)
        elif offset == QUEUE_READY:
            device.set_queue_ready(queue, bool(value & 1))
        elif offset == STATUS:
            self._write_status(value)
        else:
            log.debug("%s: ignored write of %#x at %#x", self.region.name, value, offset)

    def _write_status(self, value: int) -> None:
        self.device.write_status(value)
        if value == 0:
            self._device_features_select = self._driver_features_select = 0
            self._queue_select = 0
            self._acknowledge(0xFFFF_FFFF)
