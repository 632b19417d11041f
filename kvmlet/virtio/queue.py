"""Split virtqueues (virtio 1.2 §2.7) over bounds-checked guest memory.

A split virtqueue is three guest-memory structures the driver lays out and the device reads:
the descriptor table (16-byte entries: address, length, flags, next), the available ring (the
driver's list of chain heads, plus `used_event`) and the used ring (the device's list of
completed heads with the bytes it wrote, plus `avail_event`).

Everything in them is written by the guest and therefore hostile. `Virtqueue.pop()` walks a
chain with a bounded budget (a loop ends the walk), checks every index against its table, every
buffer against guest RAM, the readable-before-writable order and the indirect-table rules; any
violation raises `VirtqueueError`, which the device turns into DEVICE_NEEDS_RESET.

Several threads may serve one queue: `lock` (the ring lock) guards the ring positions and
views, `in_flight` counts the chains taken and not yet returned, and `epoch` changes with every
activation and deactivation, so a request that outlives its queue's reset is never pushed into
the rings of the next driver.
"""

from __future__ import annotations

import struct
import sys
import threading
from collections.abc import Callable

from kvmlet.errors import GuestMemoryError
from kvmlet.memory import GuestMemory, HostIovec, full_barrier

VIRTQ_DESC_F_NEXT = 1
VIRTQ_DESC_F_WRITE = 2
VIRTQ_DESC_F_INDIRECT = 4
VIRTQ_USED_F_NO_NOTIFY = 1
VIRTQ_AVAIL_F_NO_INTERRUPT = 1

MAX_QUEUE_SIZE = 32768
DESCRIPTOR_SIZE = 16
MAX_CHAIN_BYTES = 0xFFFF_FFFF

_DESCRIPTOR = struct.Struct("<QIHH")
_U16 = struct.Struct("<H")
_USED_ELEMENT = struct.Struct("<II")
_LITTLE_ENDIAN_HOST = sys.byteorder == "little"
# Below this many entries, walking a table descriptor by descriptor costs no more (measured).
WHOLE_TABLE_MIN_ENTRIES = 8
_ASCENDING = list(range(MAX_QUEUE_SIZE + 1))
_READABLE_LINK = [VIRTQ_DESC_F_NEXT]
_WRITABLE_LINK = [VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE]


class VirtqueueError(Exception):
    """The driver broke the virtqueue protocol (guest-controlled: never fatal to the monitor)."""


def vring_need_event(event_index: int, new_index: int, old_index: int) -> bool:
    """Whether moving an index from `old_index` to `new_index` crossed `event_index` (mod 2**16)."""
    return (new_index - event_index - 1) & 0xFFFF < (new_index - old_index) & 0xFFFF


def slice_views(views: list[memoryview], start: int, stop: int) -> list[memoryview]:
    """The bytes [start, stop) of the concatenation of `views`, as zero-copy views."""
    if views and stop <= len(views[0]):
        return [views[0][start:stop]] if start < stop else []
    result = []
    position = 0
    for view in views:
        end = position + len(view)
        low, high = max(start, position), min(stop, end)
        if low < high:
            result.append(view[low - position : high - position])
        position = end
        if position >= stop:
            break
    return result


def _table_columns(table: memoryview) -> tuple[list[int], list[int], list[int], list[int]]:
    """The addresses, lengths, flags and next indexes of a descriptor table, each as a list.

    Strided views over the table read as native integers, which are virtio's little-endian
    fields on a little-endian host (callers check): no Python loop per descriptor.
    """
    as_u64, as_u32, as_u16 = table.cast("Q"), table.cast("I"), table.cast("H")
    return (
        as_u64[0::2].tolist(),
        as_u32[2::4].tolist(),
        as_u16[6::8].tolist(),
        as_u16[7::8].tolist(),
    )


class DescriptorChain:
    """One available chain: its head index and its buffers, readable ones first.

    Buffers are guest addresses with their lengths (two parallel lists), each checked to lie
    inside guest RAM when the chain was popped. A chain walked buffer by buffer comes with
    zero-copy views of every buffer (its bounds checks made them). A chain read as a whole
    table comes with the host iovec its one bounds check built (`GuestMemory.host_iovec`),
    which a block device hands to preadv/pwritev, and views of its first and last buffers
    only, views of the others made if asked for; or, on a queue that wants no iovec
    (`Virtqueue.wants_iovec`), with views of every buffer made by that one check.
    """

    __slots__ = (
        "addresses",
        "first_view",
        "head",
        "iovec",
        "known_views",
        "last_view",
        "lengths",
        "memory",
        "readable_count",
        "readable_length",
        "writable_length",
    )

    def __init__(
        self,
        head: int,
        addresses: list[int],
        lengths: list[int],
        readable_count: int,
        readable_length: int,
        writable_length: int,
        memory: GuestMemory,
        first_view: memoryview,
        last_view: memoryview,
        known_views: list[memoryview] | None = None,
        iovec: HostIovec | None = None,
    ):
        self.head = head
        self.addresses = addresses
        self.lengths = lengths
        self.readable_count = readable_count
        self.readable_length = readable_length
        self.writable_length = writable_length
        self.memory = memory
        self.first_view = first_view  # where requests usually start with a header
        self.last_view = last_view  # where a device usually writes a status
        self.known_views = known_views
        self.iovec = iovec  # for a chain read as a whole table, else None

    def __repr__(self) -> str:
        return (
            f"DescriptorChain(head={self.head}, {len(self.addresses)} buffers, "
            f"{self.readable_length} bytes readable, {self.writable_length} writable)"
        )

    @property
    def readable(self) -> list[tuple[int, int]]:
        """The readable buffers as (guest address, length) pairs."""
        count = self.readable_count
        return list(zip(self.addresses[:count], self.lengths[:count], strict=True))

    @property
    def writable(self) -> list[tuple[int, int]]:
        """The writable buffers as (guest address, length) pairs."""
        count = self.readable_count
        return list(zip(self.addresses[count:], self.lengths[count:], strict=True))

    @property
    def views(self) -> list[memoryview]:
        """Views of every buffer in chain order (made on first use, then kept)."""
        if self.known_views is None:
            self.known_views = self.memory.views(self.addresses, self.lengths)
        return self.known_views

    @property
    def readable_views(self) -> list[memoryview]:
        views = self.known_views
        return (self.views if views is None else views)[: self.readable_count]

    @property
    def writable_views(self) -> list[memoryview]:
        views = self.known_views
        return (self.views if views is None else views)[self.readable_count :]

    def read(self, start: int = 0, stop: int | None = None) -> bytes:
        """A copy of readable bytes [start, stop) (to the end when stop is None)."""
        end = self.readable_length if stop is None else stop
        return b"".join(slice_views(self.readable_views, start, end))

    def write(self, data: bytes | bytearray | memoryview, offset: int = 0) -> int:
        """Copy `data` into the writable buffers from `offset`; returns the bytes copied."""
        source = memoryview(data).cast("B")
        copied = 0
        for view in slice_views(self.writable_views, offset, offset + len(source)):
            view[:] = source[copied : copied + len(view)]
            copied += len(view)
        return copied


class Virtqueue:
    """The device side of one split virtqueue.

    The transport fills in `size`, the three ring addresses and `ready`; the device calls
    `activate()` when the driver sets DRIVER_OK (or readies the queue afterwards), then `pop()`,
    `push()` and `needs_interrupt()` from its worker threads, holding `lock` for each.
    """

    def __init__(self, memory: GuestMemory, max_size: int):
        if not (0 < max_size <= MAX_QUEUE_SIZE and max_size & (max_size - 1) == 0):
            raise ValueError(f"queue size {max_size} is not a power of two up to 32768")
        self.memory = memory
        self.max_size = max_size
        self.lock = threading.Lock()
        self.idle = threading.Condition(self.lock)  # notified when in_flight drops to 0
        self.draining = 0  # threads waiting on `idle`
        self.on_idle: Callable[[], None] | None = None  # called once when in_flight drops to 0
        self.in_flight = 0
        self.epoch = 0
        self.wants_iovec = True
        """Whether a chain read as a whole table comes with a host iovec (for preadv/pwritev
        on it: virtio-blk) or, when False, with views of all its buffers (virtio-9p, which
        hands the server views)."""
        self._views: tuple[memoryview, ...] = ()
        self.reset()

    def reset(self) -> None:
        """Back to the state after a device reset (releasing any guest-memory views)."""
        self.deactivate()
        self.size = self.max_size
        self.ready = False
        self.descriptor_table = 0
        self.available_ring = 0
        self.used_ring = 0

    def deactivate(self) -> None:
        """Forget the ring views and positions (the queue's configuration stays)."""
        for view in self._views:
            view.release()
        self._views = ()
        self.epoch += 1
        self.active = False
        self.event_index = False
        self.indirect = False
        self.last_available = 0
        self._available_shadow = 0
        self.used_index = 0
        self._signalled_used = 0

    def activate(self, event_index: bool, indirect: bool) -> None:
        """Validate the driver's layout and start using the rings; raises VirtqueueError."""
        self.deactivate()
        size = self.size
        if not (0 < size <= self.max_size and size & (size - 1) == 0):
            raise VirtqueueError(f"queue size {size} is not a power of two up to {self.max_size}")
        layout = (
            ("descriptor table", self.descriptor_table, DESCRIPTOR_SIZE * size, 16),
            ("available ring", self.available_ring, 6 + 2 * size, 2),
            ("used ring", self.used_ring, 6 + 8 * size, 4),
        )
        for name, address, _, alignment in layout:
            if address % alignment:
                raise VirtqueueError(f"{name} at {address:#x} is not {alignment}-byte aligned")
        views = []
        for name, address, length, _ in layout:
            try:
                views.append(self.memory.view(address, length))
            except GuestMemoryError as error:
                for view in views:
                    view.release()
                raise VirtqueueError(f"{name}: {error}") from None
        self._descriptors, self._available, self._used = views
        self._views = tuple(views)
        self.event_index = event_index
        self.indirect = indirect
        self.epoch += 1
        self.active = True

    def save_state(self) -> dict[str, object]:
        """The driver's layout and the device's positions in the rings (what the rings
        themselves hold is in guest RAM)."""
        return {
            "size": self.size,
            "ready": self.ready,
            "rings": [self.descriptor_table, self.available_ring, self.used_ring],
            "active": self.active,
            "event_index": self.event_index,
            "indirect": self.indirect,
            "last_available": self.last_available,
            "used_index": self.used_index,
            "signalled_used": self._signalled_used,
        }

    def load_state(self, state: dict) -> None:
        """Take a saved state; an active queue is activated again over the (restored) guest
        RAM, so a layout outside RAM is refused as it was when the driver set it up."""
        self.reset()
        self.size = state["size"] & 0xFFFF
        self.ready = bool(state["ready"])
        self.descriptor_table, self.available_ring, self.used_ring = (
            address & 0xFFFF_FFFF_FFFF_FFFF for address in state["rings"]
        )
        if state["active"]:
            self.activate(bool(state["event_index"]), bool(state["indirect"]))
            self.last_available = self._available_shadow = state["last_available"] & 0xFFFF
            self.used_index = state["used_index"] & 0xFFFF
            self._signalled_used = state["signalled_used"] & 0xFFFF

    def chain_at(self, head: int) -> DescriptorChain:
        """The chain whose head is `head`, walked again (a chain a device took before a
        snapshot and still held); VirtqueueError if the ring no longer holds one there."""
        if not 0 <= head < self.size:
            raise VirtqueueError(f"descriptor index {head} outside a table of {self.size}")
        return self._walk(head)

    def pop(self) -> DescriptorChain | None:
        """The next available chain, or None when the driver has posted nothing new.

        The available index is read from guest memory only once all chains seen at the previous
        read have been taken, so a batch costs one read of `avail.idx`.
        """
        if self.last_available == self._available_shadow:
            self._available_shadow = _U16.unpack_from(self._available, 2)[0]
            pending = (self._available_shadow - self.last_available) & 0xFFFF
            if pending > self.size:
                raise VirtqueueError(f"{pending} new buffers claimed in a ring of {self.size}")
            if pending == 0:
                return None
        slot = self.last_available & (self.size - 1)
        head = _U16.unpack_from(self._available, 4 + 2 * slot)[0]
        self.last_available = (self.last_available + 1) & 0xFFFF
        return self._walk(head)

    def _in_order_table(self, head: int, table: memoryview, entries: int) -> DescriptorChain | None:
        """An indirect table whose chain is its entries in order, readable ones first, all in
        the low-RAM bank, checked with C-level operations over the whole table (no Python loop
        per descriptor); None for any other table, which `_walk` then walks (and refuses with
        the precise error when it is broken)."""
        if entries > self.size or not _LITTLE_ENDIAN_HOST:
            return None
        addresses, lengths, flags, links = _table_columns(table)
        last = entries - 1
        if links[:last] != _ASCENDING[1:entries]:
            return None
        if flags[last] == VIRTQ_DESC_F_WRITE:
            readable = flags.count(VIRTQ_DESC_F_NEXT)
            expected = _READABLE_LINK * readable + _WRITABLE_LINK * (last - readable) + flags[last:]
        elif flags[last] == 0:
            readable = entries
            expected = _READABLE_LINK * last + flags[last:]
        else:
            return None
        if flags != expected or sum(lengths) > MAX_CHAIN_BYTES:
            return None
        memory = self.memory
        if self.wants_iovec:
            iovec, views = memory.host_iovec(addresses, lengths), None
            if iovec is None:
                return None
            first = memory.view(addresses[0], lengths[0])
            final = memory.view(addresses[last], lengths[last])
        else:
            iovec, views = None, memory.low_views(addresses, lengths)
            if views is None:
                return None
            first, final = views[0], views[last]
        readable_length = sum(lengths[:readable])
        return DescriptorChain(
            head,
            addresses,
            lengths,
            readable,
            readable_length,
            sum(lengths) - readable_length,
            memory,
            first,
            final,
            views,
            iovec,
        )

    def _walk(self, head: int) -> DescriptorChain:
        """The chain at `head`, descriptor by descriptor; a large indirect table at the head
        (what Linux posts for a request of many buffers) is read whole when it is in order."""
        addresses: list[int] = []
        lengths: list[int] = []
        views: list[memoryview] = []
        table, table_entries = self._descriptors, self.size
        index, in_indirect_table = head, False
        buffers = readable_count = readable_bytes = writable_bytes = 0
        view_of, limit = self.memory.view, self.size
        while True:
            if index >= table_entries:
                raise VirtqueueError(f"descriptor index {index} outside a table of {table_entries}")
            address, length, flags, next_index = _DESCRIPTOR.unpack_from(table, 16 * index)
            if flags & VIRTQ_DESC_F_INDIRECT:
                table, table_entries = self._indirect(address, length, flags, in_indirect_table)
                if not buffers and table_entries >= WHOLE_TABLE_MIN_ENTRIES:
                    chain = self._in_order_table(head, table, table_entries)
                    if chain is not None:
                        return chain
                index, in_indirect_table = 0, True
                continue
            buffers += 1
            if buffers > limit:
                raise VirtqueueError(f"chain at head {head} is longer than the queue (a loop?)")
            try:
                views.append(view_of(address, length))
            except GuestMemoryError:
                raise VirtqueueError(
                    f"buffer of {length} bytes at {address:#x} is outside RAM"
                ) from None
            addresses.append(address)
            lengths.append(length)
            if flags & VIRTQ_DESC_F_WRITE:
                writable_bytes += length
            elif readable_count != buffers - 1:
                raise VirtqueueError(f"chain at head {head}: readable buffer after a writable one")
            else:
                readable_count += 1
                readable_bytes += length
            if readable_bytes + writable_bytes > MAX_CHAIN_BYTES:
                raise VirtqueueError(f"chain at head {head} is longer than 4 GiB")
            if not flags & VIRTQ_DESC_F_NEXT:
                return DescriptorChain(
                    head,
                    addresses,
                    lengths,
                    readable_count,
                    readable_bytes,
                    writable_bytes,
                    self.memory,
                    views[0],
                    views[-1],
                    views,
                )
            index = next_index

    def _indirect(
        self, address: int, length: int, flags: int, in_indirect_table: bool
    ) -> tuple[memoryview, int]:
        if not self.indirect:
            raise VirtqueueError("indirect descriptor without VIRTIO_F_INDIRECT_DESC")
        if in_indirect_table:
            raise VirtqueueError("indirect descriptor inside an indirect table")
        if flags & VIRTQ_DESC_F_NEXT:
            raise VirtqueueError("indirect descriptor with the NEXT flag")
        if length == 0 or length % DESCRIPTOR_SIZE:
            raise VirtqueueError(f"indirect table length {length} is not a multiple of 16")
        try:
            return self.memory.view(address, length), length // DESCRIPTOR_SIZE
        except GuestMemoryError as error:
            raise VirtqueueError(f"indirect table: {error}") from None

    def push(self, head: int, written: int) -> None:
        """Return chain `head` to the driver, saying the device wrote `written` bytes into it."""
        slot = self.used_index & (self.size - 1)
        _USED_ELEMENT.pack_into(self._used, 4 + 8 * slot, head, written)
        self.used_index = (self.used_index + 1) & 0xFFFF
        _U16.pack_into(self._used, 2, self.used_index)

    def has_available(self) -> bool:
        """Whether the driver has posted chains not taken yet (without taking one)."""
        if self.last_available != self._available_shadow:
            return True
        return _U16.unpack_from(self._available, 2)[0] != self.last_available

    def needs_interrupt(self) -> bool:
        """Whether the driver wants an interrupt for what was pushed since the last call."""
        old, new = self._signalled_used, self.used_index
        self._signalled_used = new
        if old == new:
            return False
        full_barrier()  # the used index (stored) before used_event or the flags (loaded)
        if self.event_index:
            used_event = _U16.unpack_from(self._available, 4 + 2 * self.size)[0]
            return vring_need_event(used_event, new, old)
        return not _U16.unpack_from(self._available, 0)[0] & VIRTQ_AVAIL_F_NO_INTERRUPT

    def disable_notifications(self) -> None:
        """Ask the driver not to kick while the device is already processing the queue."""
        if not self.event_index:
            _U16.pack_into(self._used, 0, VIRTQ_USED_F_NO_NOTIFY)

    def enable_notifications(self) -> bool:
        """Ask for a kick on the next new buffer; returns whether buffers arrived meanwhile."""
        if self.event_index:
            _U16.pack_into(self._used, 4 + 8 * self.size, self.last_available)
        else:
            _U16.pack_into(self._used, 0, 0)
        full_barrier()  # what was just published (stored) before avail.idx (loaded)
        return _U16.unpack_from(self._available, 2)[0] != self.last_available
