"""The transport-independent part of a virtio device (virtio 1.2 §2, §3, §6).

A `VirtioDevice` owns what every transport exposes the same way: the device id, the feature
bits and their negotiation, the device status register, the device-specific configuration
space with its generation counter, and the virtqueues. Transports (PCI, MMIO) translate their
registers into calls on it, call `notify(queue)` when the driver kicks a queue, and receive
interrupts through the `InterruptSink` they connect, so a device never knows its transport.

Register accesses come from vCPU threads while queues are processed on a worker thread: one
lock per device serialises both. A protocol violation by the driver (a broken chain, rings
outside RAM) sets DEVICE_NEEDS_RESET and raises a configuration interrupt; the device then
ignores its queues until the driver resets it.
"""

from __future__ import annotations

import enum
import threading
from collections.abc import Callable
from typing import Protocol

from kvmlet.errors import GuestMemoryError, KvmletError, LazyLogger
from kvmlet.memory import GuestMemory
from kvmlet.virtio.queue import DescriptorChain, Virtqueue, VirtqueueError

log = LazyLogger(__name__)

# Device status bits (§2.1).
ACKNOWLEDGE = 1
DRIVER = 2
DRIVER_OK = 4
FEATURES_OK = 8
DEVICE_NEEDS_RESET = 64
FAILED = 128

# Reserved feature bits every device here offers (§6).
VIRTIO_F_INDIRECT_DESC = 28
VIRTIO_F_EVENT_IDX = 29
VIRTIO_F_VERSION_1 = 32

COMMON_FEATURES = 1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_F_EVENT_IDX | 1 << VIRTIO_F_INDIRECT_DESC


class InterruptKind(enum.Enum):
    """Why the device interrupts the driver."""

    QUEUE = "queue"
    CONFIG = "config"


class InterruptSink(Protocol):
    """What a transport provides to deliver a device's interrupts (INTx, MSI-X vector, ...)."""

    def __call__(self, kind: InterruptKind, queue_index: int | None) -> None:
        """Signal the driver; `queue_index` is set for queue interrupts, None for config."""


class RingPart(enum.Enum):
    """The three guest structures of a split virtqueue, as transports name their addresses."""

    DESCRIPTOR = "descriptor"
    DRIVER = "driver"
    DEVICE = "device"


class QueueStats:
    """Per-queue counters for the statistics dump (`vars()` of one is its line there)."""

    def __init__(self) -> None:
        self.notifications = 0
        self.requests = 0
        self.bytes_from_guest = 0
        self.bytes_to_guest = 0
        self.interrupts = 0


class VirtioDevice:
    """Base class of the virtio devices: features, status, config space and queues."""

    device_id: int = 0
    name: str = "virtio"

    def __init__(
        self, memory: GuestMemory, queue_sizes: list[int], device_features: int, config: bytes
    ):
        self.memory = memory
        self.device_features = device_features | COMMON_FEATURES
        self.queues = [Virtqueue(memory, size) for size in queue_sizes]
        self.queue_stats = [QueueStats() for _ in queue_sizes]
        self.config_interrupts = 0
        self.config_generation = 0
        self.last_error: str | None = None
        self._config = bytearray(config)
        self._interrupt: InterruptSink | None = None
        self._lock = threading.RLock()
        self.driver_features = 0
        self.status = 0

    def connect_interrupts(self, sink: InterruptSink) -> None:
        """Called by the transport once: where queue and configuration interrupts go."""
        self._interrupt = sink

    # Snapshots ---------------------------------------------------------------------------------

    def save_state(self) -> dict[str, object]:
        """Status, negotiated features, configuration space and generation, and every queue;
        a device with more state extends it (its own module knows what)."""
        with self._lock:
            return {
                "status": self.status,
                "device_features": self.device_features,
                "driver_features": self.driver_features,
                "config": bytes(self._config),
                "config_generation": self.config_generation,
                "last_error": self.last_error,
                "queues": [queue.save_state() for queue in self.queues],
            }

    def load_state(self, state: dict) -> None:
        """Take a saved state without running the driver's transitions again (no activation
        hooks: the device is as the driver left it). KvmletError when the driver has
        accepted a feature this device does not offer now (another host, another backend)."""
        with self._lock:
            driver_features = state["driver_features"]
            lost = driver_features & ~self.device_features
            if lost and state["status"] & FEATURES_OK:
                raise KvmletError(
                    f"the guest's driver uses features this {self.name} no longer offers "
                    f"({lost:#x})"
                )
            config = bytes(state["config"])
            if len(config) != len(self._config) or len(state["queues"]) != len(self.queues):
                raise ValueError("the saved configuration space or queues differ in size")
            self.status = state["status"] & 0xFF
            self.driver_features = driver_features
            self._config[:] = config
            self.config_generation = state["config_generation"] & 0xFFFF_FFFF
            self.last_error = state["last_error"]
            for index, (queue, saved) in enumerate(zip(self.queues, state["queues"], strict=True)):
                try:
                    queue.load_state(saved)
                except VirtqueueError as error:
                    raise KvmletError(f"queue {index}: {error}") from None

    # Features (§2.2) -------------------------------------------------------------------------

    def device_features_word(self, select: int) -> int:
        """Feature bits 32*select .. 32*select+31, as the transports' selector windows show them."""
        return (self.device_features >> (32 * select)) & 0xFFFF_FFFF if 0 <= select < 2 else 0

    def write_driver_features_word(self, select: int, value: int) -> None:
        """The driver accepts features through a 32-bit window (ignored after FEATURES_OK)."""
        with self._lock:
            if self.status & FEATURES_OK or not 0 <= select < 2:
                return
            shift = 32 * select
            kept = self.driver_features & ~(0xFFFF_FFFF << shift)
            self.driver_features = kept | ((value & 0xFFFF_FFFF) << shift)

    def negotiated(self, bit: int) -> bool:
        return bool(self.driver_features >> bit & 1)

    # Status (§2.1, §3.1) ----------------------------------------------------------------------

    def write_status(self, value: int) -> None:
        """The driver writes the device status register: 0 resets the device."""
        with self._lock:
            value &= 0xFF
            if value == 0:
                self.reset()
                return
            if value & FEATURES_OK and not self.status & FEATURES_OK and not self._features_ok():
                value &= ~FEATURES_OK
            value = (value & ~DEVICE_NEEDS_RESET) | (self.status & DEVICE_NEEDS_RESET)
            starting = value & DRIVER_OK and not self.status & DRIVER_OK
            self.status = value
            if starting and value & FEATURES_OK:
                for index, queue in enumerate(self.queues):
                    if queue.ready:
                        self._activate_queue(index)
                self.activate()

    def _features_ok(self) -> bool:
        accepted = self.driver_features
        return accepted & ~self.device_features == 0 and bool(accepted >> VIRTIO_F_VERSION_1 & 1)

    def reset(self) -> None:
        """Device reset: status, features and queues back to their initial state."""
        with self._lock:
            self.status = 0
            self.driver_features = 0
            self.last_error = None
            for queue in self.queues:
                queue.reset()
            self.reset_device()

    def activate(self) -> None:
        """Hook: the driver set DRIVER_OK (queues are active). Devices override as needed."""

    def reset_device(self) -> None:
        """Hook: device-specific state to clear on reset. Devices override as needed."""

    def close(self) -> None:
        """Release guest-memory views and host resources (before guest memory is closed)."""
        with self._lock:
            for queue in self.queues:
                queue.reset()

    @property
    def running(self) -> bool:
        """DRIVER_OK is set and the device has not given up on the driver."""
        return self.status & (DRIVER_OK | DEVICE_NEEDS_RESET) == DRIVER_OK

    def fail(self, reason: str) -> None:
        """The driver broke the protocol: set DEVICE_NEEDS_RESET and tell it (§2.1.2)."""
        log.warning("%s: device needs reset: %s", self.name, reason)
        self.last_error = reason
        self.status |= DEVICE_NEEDS_RESET
        if self.status & DRIVER_OK:
            self.signal_config()

    # Configuration space (§2.5) ---------------------------------------------------------------

    @property
    def config_size(self) -> int:
        return len(self._config)

    def read_config(self, offset: int, size: int) -> int:
        """A little-endian read of the device configuration; bytes past its end read as 0."""
        with self._lock:
            if offset < 0 or size <= 0:
                return 0
            return int.from_bytes(self._config[offset : offset + size].ljust(size, b"\0"), "little")

    def write_config(self, offset: int, size: int, value: int) -> None:
        """The driver writes configuration space; the devices here have no writable fields."""
        log.debug("%s: ignored config write of %d bytes at %#x", self.name, size, offset)

    def update_config(self, config: bytes) -> None:
        """The device changes its configuration: bump the generation and interrupt the driver."""
        with self._lock:
            self._config[:] = config
            self.config_generation = (self.config_generation + 1) & 0xFFFF_FFFF
            if self.running:
                self.signal_config()

    # Queues -----------------------------------------------------------------------------------

    @property
    def queue_count(self) -> int:
        return len(self.queues)

    def _queue(self, index: int) -> Virtqueue | None:
        return self.queues[index] if 0 <= index < len(self.queues) else None

    def queue_max_size(self, index: int) -> int:
        """0 for a queue the device does not have (what transports report for it)."""
        queue = self._queue(index)
        return queue.max_size if queue else 0

    def queue_size(self, index: int) -> int:
        queue = self._queue(index)
        return queue.size if queue else 0

    def set_queue_size(self, index: int, size: int) -> None:
        with self._lock:
            queue = self._queue(index)
            if queue and not queue.ready:
                queue.size = size & 0xFFFF

    def queue_address(self, index: int, part: RingPart) -> int:
        queue = self._queue(index)
        if queue is None:
            return 0
        return {
            RingPart.DESCRIPTOR: queue.descriptor_table,
            RingPart.DRIVER: queue.available_ring,
            RingPart.DEVICE: queue.used_ring,
        }[part]

    def set_queue_address(self, index: int, part: RingPart, address: int) -> None:
        with self._lock:
            queue = self._queue(index)
            if queue is None or queue.ready:
                return
            address &= 0xFFFF_FFFF_FFFF_FFFF
            if part is RingPart.DESCRIPTOR:
                queue.descriptor_table = address
            elif part is RingPart.DRIVER:
                queue.available_ring = address
            else:
                queue.used_ring = address

    def queue_ready(self, index: int) -> bool:
        queue = self._queue(index)
        return bool(queue and queue.ready)

    def set_queue_ready(self, index: int, ready: bool) -> None:
        """Enable a queue; a queue readied after DRIVER_OK starts at once."""
        with self._lock:
            queue = self._queue(index)
            if queue is None or queue.ready == ready:
                return
            queue.ready = ready
            if not ready:
                queue.deactivate()
            elif self.status & DRIVER_OK:
                self._activate_queue(index)

    def _activate_queue(self, index: int) -> None:
        try:
            self.queues[index].activate(
                event_index=self.negotiated(VIRTIO_F_EVENT_IDX),
                indirect=self.negotiated(VIRTIO_F_INDIRECT_DESC),
            )
        except VirtqueueError as error:
            self.fail(f"queue {index}: {error}")

    def notify(self, queue_index: int) -> None:
        """The driver kicked queue `queue_index` (from an eventfd worker or a bus handler)."""
        with self._lock:
            queue = self._queue(queue_index)
            if queue is None:
                return
            self.queue_stats[queue_index].notifications += 1
            if self.running and queue.active:
                self.guarded(queue_index, self.queue_notified)

    def guarded(self, queue_index: int, work: Callable[[int], None]) -> None:
        """Run queue work; a protocol violation by the driver becomes NEEDS_RESET, not a crash."""
        try:
            work(queue_index)
        except (VirtqueueError, GuestMemoryError) as error:
            self.fail(f"queue {queue_index}: {error}")

    def queue_notified(self, queue_index: int) -> None:
        """Hook: process what the driver posted on a queue. Devices override it."""
        raise NotImplementedError

    def process_available(self, queue_index: int, handle: Callable[[DescriptorChain], int]) -> None:
        """Complete every available chain with `handle(chain) -> bytes written`, then signal."""
        queue = self.queues[queue_index]
        stats = self.queue_stats[queue_index]
        requests = bytes_from_guest = bytes_to_guest = 0
        try:
            while True:
                queue.disable_notifications()
                while (chain := queue.pop()) is not None:
                    written = handle(chain)
                    queue.push(chain.head, written)
                    requests += 1
                    bytes_from_guest += chain.readable_length
                    bytes_to_guest += written
                if not queue.enable_notifications():
                    break
        finally:
            stats.requests += requests
            stats.bytes_from_guest += bytes_from_guest
            stats.bytes_to_guest += bytes_to_guest
        self.signal_used(queue_index)

    def signal_used(self, queue_index: int) -> None:
        """Interrupt the driver for used buffers, unless it suppressed that interrupt."""
        if self.queues[queue_index].needs_interrupt():
            self.queue_stats[queue_index].interrupts += 1
            if self._interrupt is not None:
                self._interrupt(InterruptKind.QUEUE, queue_index)

    def signal_config(self) -> None:
        self.config_interrupts += 1
        if self._interrupt is not None:
            self._interrupt(InterruptKind.CONFIG, None)

    def stats(self) -> dict[str, object]:
        """Counters for the statistics dump: per queue, plus configuration interrupts."""
        with self._lock:
            return {
                "device": self.name,
                "config_interrupts": self.config_interrupts,
                "needs_reset": bool(self.status & DEVICE_NEEDS_RESET),
                "queues": [vars(stats).copy() for stats in self.queue_stats],
            }
