"""The transport-independent part of a virtio device (virtio 1.2 §2, §3, §6).

A `VirtioDevice` owns what every transport exposes the same way: the device id, the feature
bits and their negotiation, the device status register, the device-specific configuration
space with its generation counter, and the virtqueues. Transports (PCI, MMIO) translate their
registers into calls on it, call `notify(queue)` when the driver kicks a queue, and receive
interrupts through the `InterruptSink` they connect, so a device never knows its transport.

Register accesses come from vCPU threads and are serialised by the device's register lock
(`_lock`); queues are served by worker threads (`serving.RequestServing`), under each queue's
ring lock only, so a register access never waits for host I/O. The one exception is a reset,
which, as on hardware, completes once the requests in flight have (`drain`). A protocol
violation by the driver (a broken chain, rings outside RAM) sets DEVICE_NEEDS_RESET and raises
a configuration interrupt; the device then ignores its queues until the driver resets it.
Lock order: register lock, then a ring lock; interrupts are raised with neither held by the
serving path (a register write that raises one holds the register lock: then the transport's
locks come after it).
"""

from __future__ import annotations

import enum
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from kvmlet.errors import KvmletError, LazyLogger
from kvmlet.memory import GuestMemory
from kvmlet.virtio.queue import Virtqueue, VirtqueueError
from kvmlet.virtio.serving import RequestServing

if TYPE_CHECKING:
    from kvmlet.virtio.call import CallEventfd

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
RESET_DRAIN_TIMEOUT = 30.0
"""Seconds a reset waits for requests in flight (host I/O) before it goes on without them;
a request that finishes later is dropped, not pushed into the next driver's rings."""


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


def _queue_state(queue: Virtqueue) -> dict[str, object]:
    with queue.lock:
        return queue.save_state()


class VirtioDevice(RequestServing):
    """Base class of the virtio devices: features, status, config space and queues."""

    device_id: int = 0
    name: str = "virtio"
    msix_vectors: int | None = None
    """MSI-X vectors the PCI transport offers; None: one per queue and one for configuration
    changes. Fewer make a Linux driver share one vector among all its queues."""

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
        self._kicks: list[Callable[[], None] | None] = [None] * len(queue_sizes)
        self.driver_features = 0
        self.status = 0
        self._init_serving()

    def connect_interrupts(self, sink: InterruptSink) -> None:
        """Called by the transport once: where queue and configuration interrupts go."""
        self._interrupt = sink

    # Snapshots ---------------------------------------------------------------------------------

    def save_state(self) -> dict[str, object]:
        """Status, negotiated features, configuration space and generation, and every queue;
        a device with more state extends it (its own module knows what). KvmletError while
        a request is in flight (a paused machine's workers have none: see
        `QueueWorker.pause`): a request half served cannot be carried."""
        with self._lock:
            busy = [index for index, queue in enumerate(self.queues) if queue.in_flight]
            if busy:
                raise KvmletError(f"{self.name}: a request of queue {busy[0]} is in flight")
            return {
                "status": self.status,
                "device_features": self.device_features,
                "driver_features": self.driver_features,
                "config": bytes(self._config),
                "config_generation": self.config_generation,
                "last_error": self.last_error,
                "queues": [_queue_state(queue) for queue in self.queues],
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
                    with queue.lock:
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
        """Device reset: status, features and queues back to their initial state, once the
        requests in flight are done (they are then dropped, not pushed)."""
        with self._lock:
            self.status = 0
            self.driver_features = 0
            self.last_error = None
            for queue in self.queues:
                with queue.lock:
                    queue.reset()
            if not self.drain(RESET_DRAIN_TIMEOUT):
                self.guest_log.warning(
                    (self.name, "drain"), "%s: reset with requests still in flight", self.name
                )
            self.reset_device()

    def activate(self) -> None:
        """Hook: the driver set DRIVER_OK (queues are active). Devices override as needed."""

    def reset_device(self) -> None:
        """Hook: device-specific state to clear on reset. Devices override as needed."""

    def close(self) -> None:
        """Stop using the rings (before guest memory is closed). Requests still in flight are
        dropped when they finish; a device's host resources outlive them (see VirtioBlock)."""
        with self._lock:
            for queue in self.queues:
                with queue.lock:
                    queue.reset()

    @property
    def running(self) -> bool:
        """DRIVER_OK is set and the device has not given up on the driver."""
        return self.status & (DRIVER_OK | DEVICE_NEEDS_RESET) == DRIVER_OK

    def fail(self, reason: str, queue_index: int | None = None, epoch: int | None = None) -> None:
        """The driver broke the protocol: set DEVICE_NEEDS_RESET and tell it (§2.1.2). From a
        queue, `epoch` says which activation of the queue saw it: a failure seen on rings the
        driver has since reset is no longer the device's state."""
        with self._lock:
            if epoch is not None and self.queues[queue_index or 0].epoch != epoch:
                return
            self.guest_log.warning(
                (self.name, "needs reset"), "%s: device needs reset: %s", self.name, reason
            )
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
                with queue.lock:
                    queue.deactivate()
            elif self.status & DRIVER_OK:
                self._activate_queue(index)

    def _activate_queue(self, index: int) -> None:
        queue = self.queues[index]
        try:
            with queue.lock:
                queue.activate(
                    event_index=self.negotiated(VIRTIO_F_EVENT_IDX),
                    indirect=self.negotiated(VIRTIO_F_INDIRECT_DESC),
                )
        except VirtqueueError as error:
            self.fail(f"queue {index}: {error}")

    def call_eventfd(self, queue_index: int) -> CallEventfd | None:
        """The queue's interrupt when a backend signals it on an eventfd (vhost), which a
        transport may bind to an MSI-X vector; None: the device raises it in Python."""
        return None

    def connect_kick(self, queue_index: int, kick: Callable[[], None] | None) -> None:
        """Where a kick of `queue_index` that reached a transport register goes: `kick()`
        (a worker's doorbell) instead of a round on the calling vCPU thread."""
        self._kicks[queue_index] = kick

    def notify(self, queue_index: int) -> None:
        """The driver kicked queue `queue_index` through a transport register (a vCPU thread).

        With a worker connected, its doorbell is rung and the worker serves the queue, so the
        vCPU goes back to the guest at once; without one (tests, benchmarks), one bounded round
        runs here."""
        queue = self._queue(queue_index)
        if queue is None:
            return
        kick = self._kicks[queue_index]
        if kick is not None:
            kick()
            return
        self.queue_stats[queue_index].notifications += 1
        self.serve(queue_index)

    def signal_used(self, queue_index: int) -> None:
        """Interrupt the driver for used buffers, unless it suppressed that interrupt."""
        queue = self.queues[queue_index]
        with queue.lock:
            wanted = queue.active and queue.needs_interrupt()
            if wanted:
                self.queue_stats[queue_index].interrupts += 1
        if wanted and self._interrupt is not None:
            self._interrupt(InterruptKind.QUEUE, queue_index)

    def signal_config(self) -> None:
        self.config_interrupts += 1
        if self._interrupt is not None:
            self._interrupt(InterruptKind.CONFIG, None)

    def stats(self) -> dict[str, object]:
        """Counters for the statistics dump: per queue, plus configuration interrupts. Read
        without a lock, so a device busy with its queues (or a reset) answers at once."""
        return {
            "device": self.name,
            "config_interrupts": self.config_interrupts,
            "needs_reset": bool(self.status & DEVICE_NEEDS_RESET),
            "device_errors": self.device_errors,
            "queues": [vars(stats).copy() for stats in self.queue_stats],
        }
