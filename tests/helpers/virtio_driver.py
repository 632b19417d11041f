"""A mock virtio driver: plays the guest's side of a `VirtioDevice` in a fake guest memory.

It negotiates features and sets the status bits like a real driver, lays out split virtqueues
(descriptor table, available ring, used ring) in guest memory, posts chains (direct or through
an indirect table), kicks queues and reads back the used ring. Everything is written with plain
`GuestMemory` accesses, exactly where a guest driver would put it, so the device code under test
sees the same bytes it would see from Linux. Interrupts are recorded, not delivered.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from kvmlet.memory import GuestMemory
from kvmlet.virtio.device import (
    ACKNOWLEDGE,
    DEVICE_NEEDS_RESET,
    DRIVER,
    DRIVER_OK,
    FEATURES_OK,
    InterruptKind,
    RingPart,
    VirtioDevice,
)
from kvmlet.virtio.queue import (
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    VIRTQ_USED_F_NO_NOTIFY,
    vring_need_event,
)

_DESCRIPTOR = struct.Struct("<QIHH")

GUEST_RAM_SIZE = 4 << 20
"""Guest RAM of the unit tests' fake guests (at guest-physical 0)."""


@dataclass
class DriverQueue:
    """The driver's bookkeeping for one queue it laid out."""

    index: int
    size: int
    descriptor_table: int
    available_ring: int
    used_ring: int
    free: list[int]
    available_index: int = 0
    last_used: int = 0
    kicked_at: int = 0
    chains: dict[int, list[int]] = field(default_factory=dict)


@dataclass(frozen=True)
class Completion:
    """One used-ring element: the head returned and the bytes the device wrote."""

    head: int
    length: int


class MockDriver:
    """Drives one device through its transport-independent interface."""

    def __init__(
        self,
        device: VirtioDevice,
        memory: GuestMemory,
        arena: int,
        arena_size: int,
        record_interrupts: bool = True,
    ):
        """`record_interrupts=False` leaves the device's interrupts to a real transport."""
        self.device = device
        self.memory = memory
        self.interrupts: list[tuple[InterruptKind, int | None]] = []
        self.queues: dict[int, DriverQueue] = {}
        self._next_free = arena
        self._arena_end = arena + arena_size
        if record_interrupts:
            device.connect_interrupts(lambda kind, queue: self.interrupts.append((kind, queue)))

    def allocate(self, size: int, alignment: int = 16) -> int:
        """Guest memory for rings and buffers, from a bump allocator over the arena."""
        address = -(-self._next_free // alignment) * alignment
        if address + size > self._arena_end:
            raise MemoryError("mock driver arena exhausted")
        self._next_free = address + size
        return address

    # Initialisation (§3.1.1) ---------------------------------------------------------------------

    def negotiate(self, wanted: int | None = None) -> int:
        """Reset, acknowledge and accept `wanted` (default: all offered) features."""
        device = self.device
        device.write_status(0)
        device.write_status(ACKNOWLEDGE)
        device.write_status(ACKNOWLEDGE | DRIVER)
        offered = device.device_features_word(0) | device.device_features_word(1) << 32
        accepted = offered if wanted is None else wanted
        device.write_driver_features_word(0, accepted & 0xFFFF_FFFF)
        device.write_driver_features_word(1, accepted >> 32)
        device.write_status(ACKNOWLEDGE | DRIVER | FEATURES_OK)
        return accepted

    def initialize(self, wanted: int | None = None, queue_size: int | None = None) -> int:
        """The whole start-up sequence: features, every queue, DRIVER_OK."""
        accepted = self.negotiate(wanted)
        if not self.device.status & FEATURES_OK:
            raise AssertionError("device refused the features")
        for index in range(self.device.queue_count):
            self.setup_queue(index, queue_size)
        self.device.write_status(ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK)
        return accepted

    def setup_queue(self, index: int, size: int | None = None) -> DriverQueue:
        """Lay out queue `index` and hand it to the device through its own interface."""
        queue = self.layout_queue(index, size or self.device.queue_max_size(index))
        self.device.set_queue_size(index, queue.size)
        self.device.set_queue_address(index, RingPart.DESCRIPTOR, queue.descriptor_table)
        self.device.set_queue_address(index, RingPart.DRIVER, queue.available_ring)
        self.device.set_queue_address(index, RingPart.DEVICE, queue.used_ring)
        self.device.set_queue_ready(index, True)
        return queue

    def layout_queue(self, index: int, size: int) -> DriverQueue:
        """Zeroed rings for queue `index` in the arena (a transport test programs them)."""
        queue = DriverQueue(
            index=index,
            size=size,
            descriptor_table=self.allocate(16 * size, 16),
            available_ring=self.allocate(6 + 2 * size, 2),
            used_ring=self.allocate(6 + 8 * size, 4),
            free=list(range(size)),
        )
        self.memory.fill(queue.descriptor_table, 16 * size)
        self.memory.fill(queue.available_ring, 6 + 2 * size)
        self.memory.fill(queue.used_ring, 6 + 8 * size)
        self.queues[index] = queue
        return queue

    @property
    def needs_reset(self) -> bool:
        return bool(self.device.status & DEVICE_NEEDS_RESET)

    # Posting and completing ----------------------------------------------------------------------

    def post(
        self,
        queue_index: int,
        readable: list[tuple[int, int]],
        writable: list[tuple[int, int]],
        indirect: bool = False,
        table: int | None = None,
    ) -> int:
        """Make a chain of (address, length) buffers available; returns its head index.

        With `indirect`, the buffers go in an indirect table at `table` (a fresh allocation
        when None; a caller posting many chains reuses its own table to keep the arena).
        """
        queue = self.queues[queue_index]
        buffers = [(a, n, 0) for a, n in readable] + [
            (a, n, VIRTQ_DESC_F_WRITE) for a, n in writable
        ]
        if indirect:
            if table is None:
                table = self.allocate(16 * len(buffers), 16)
            self._write_descriptors(table, list(range(len(buffers))), buffers)
            head = queue.free.pop()
            self.write_descriptor(queue, head, table, 16 * len(buffers), VIRTQ_DESC_F_INDIRECT, 0)
            used = [head]
        else:
            used = [queue.free.pop() for _ in buffers]
            self._write_descriptors(queue.descriptor_table, used, buffers)
            head = used[0]
        queue.chains[head] = used
        self.make_available(queue, head)
        return head

    def post_data(
        self, queue_index: int, out: list[bytes], in_sizes: list[int], indirect: bool = False
    ) -> tuple[int, list[int]]:
        """Post chains from bytes: copies `out` into fresh buffers, allocates `in_sizes` ones."""
        readable = []
        for data in out:
            address = self.allocate(len(data))
            self.memory.write(address, data)
            readable.append((address, len(data)))
        writable = [(self.allocate(size), size) for size in in_sizes]
        for address, size in writable:
            self.memory.fill(address, size, 0xEE)
        head = self.post(queue_index, readable, writable, indirect)
        return head, [address for address, _ in writable]

    def _write_descriptors(self, table: int, slots: list[int], buffers) -> None:
        for position, (slot, (address, length, flags)) in enumerate(
            zip(slots, buffers, strict=True)
        ):
            last = position == len(slots) - 1
            next_slot = 0 if last else slots[position + 1]
            flags |= 0 if last else VIRTQ_DESC_F_NEXT
            view = self.memory.view(table + 16 * slot, 16)
            _DESCRIPTOR.pack_into(view, 0, address, length, flags, next_slot)

    def write_descriptor(
        self, queue: DriverQueue, slot: int, address: int, length: int, flags: int, next_slot: int
    ) -> None:
        view = self.memory.view(queue.descriptor_table + 16 * slot, 16)
        _DESCRIPTOR.pack_into(view, 0, address, length, flags, next_slot)

    def make_available(self, queue: DriverQueue, head: int) -> None:
        slot = queue.available_index % queue.size
        self.memory.write_u16(queue.available_ring + 4 + 2 * slot, head)
        queue.available_index = (queue.available_index + 1) & 0xFFFF
        self.memory.write_u16(queue.available_ring + 2, queue.available_index)

    def should_kick(self, queue_index: int, event_index: bool) -> bool:
        """Whether a real driver would notify now (avail_event or the NO_NOTIFY flag)."""
        queue = self.queues[queue_index]
        if event_index:
            avail_event = self.memory.read_u16(queue.used_ring + 4 + 8 * queue.size)
            return vring_need_event(avail_event, queue.available_index, queue.kicked_at)
        return not self.memory.read_u16(queue.used_ring) & VIRTQ_USED_F_NO_NOTIFY

    def kick(self, queue_index: int) -> None:
        self.queues[queue_index].kicked_at = self.queues[queue_index].available_index
        self.device.notify(queue_index)

    def set_used_event(self, queue_index: int, value: int) -> None:
        queue = self.queues[queue_index]
        self.memory.write_u16(queue.available_ring + 4 + 2 * queue.size, value)

    def collect(self, queue_index: int) -> list[Completion]:
        """Take the new used elements, freeing their descriptors; moves used_event along."""
        queue = self.queues[queue_index]
        used_index = self.memory.read_u16(queue.used_ring + 2)
        completions = []
        while queue.last_used != used_index:
            slot = queue.last_used % queue.size
            head = self.memory.read_u32(queue.used_ring + 4 + 8 * slot)
            length = self.memory.read_u32(queue.used_ring + 8 + 8 * slot)
            completions.append(Completion(head, length))
            queue.free.extend(queue.chains.pop(head, []))
            queue.last_used = (queue.last_used + 1) & 0xFFFF
        self.set_used_event(queue_index, queue.last_used)
        return completions
