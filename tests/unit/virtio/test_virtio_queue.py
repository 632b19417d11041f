"""Split virtqueue: chain walking, hostile layouts, used ring, interrupt suppression."""

from __future__ import annotations

import struct

import pytest

from kvmlet.virtio.queue import (
    VIRTQ_AVAIL_F_NO_INTERRUPT,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    VIRTQ_USED_F_NO_NOTIFY,
    Virtqueue,
    VirtqueueError,
    slice_views,
    vring_need_event,
)
from tests.helpers.virtio_driver import GUEST_RAM_SIZE as RAM_SIZE

SIZE = 8
DESC, AVAIL, USED = 0x1000, 0x2000, 0x3000


def make_queue(memory, event_index=False, indirect=True) -> Virtqueue:
    queue = Virtqueue(memory, SIZE)
    queue.descriptor_table, queue.available_ring, queue.used_ring = DESC, AVAIL, USED
    queue.activate(event_index=event_index, indirect=indirect)
    return queue


def descriptor(memory, table, slot, address, length, flags=0, next_slot=0):
    memory.write(table + 16 * slot, struct.pack("<QIHH", address, length, flags, next_slot))


def make_available(memory, heads, start=0):
    for position, head in enumerate(heads):
        memory.write_u16(AVAIL + 4 + 2 * ((start + position) % SIZE), head)
    memory.write_u16(AVAIL + 2, (start + len(heads)) & 0xFFFF)


def test_vring_need_event_follows_the_wrapping_formula():
    assert vring_need_event(event_index=0, new_index=1, old_index=0)
    assert not vring_need_event(event_index=5, new_index=3, old_index=1)
    assert vring_need_event(event_index=5, new_index=6, old_index=5)
    assert vring_need_event(event_index=0xFFFF, new_index=1, old_index=0xFFFE)
    assert not vring_need_event(event_index=3, new_index=2, old_index=2)


def test_slice_views_spans_buffer_boundaries():
    views = [memoryview(b"abc"), memoryview(b"defg"), memoryview(b"hi")]
    assert [bytes(v) for v in slice_views(views, 2, 8)] == [b"c", b"defg", b"h"]
    assert slice_views(views, 9, 9) == []


def test_pops_a_direct_chain_with_readable_then_writable_buffers(memory):
    queue = make_queue(memory)
    descriptor(memory, DESC, 0, 0x10000, 4, VIRTQ_DESC_F_NEXT, 3)
    descriptor(memory, DESC, 3, 0x20000, 16, VIRTQ_DESC_F_WRITE)
    memory.write(0x10000, b"ping")
    make_available(memory, [0])
    chain = queue.pop()
    assert (chain.head, chain.readable, chain.writable) == (0, [(0x10000, 4)], [(0x20000, 16)])
    assert chain.read() == b"ping"
    assert chain.write(b"x" * 20, offset=10) == 6
    assert memory.read(0x2000A, 6) == b"x" * 6
    assert queue.pop() is None


def test_indirect_table_is_walked_when_negotiated(memory):
    queue = make_queue(memory)
    table = 0x5000
    descriptor(memory, table, 0, 0x10000, 8, VIRTQ_DESC_F_NEXT, 1)
    descriptor(memory, table, 1, 0x20000, 1, VIRTQ_DESC_F_WRITE)
    descriptor(memory, DESC, 2, table, 32, VIRTQ_DESC_F_INDIRECT)
    make_available(memory, [2])
    chain = queue.pop()
    assert (chain.head, chain.readable, chain.writable) == (2, [(0x10000, 8)], [(0x20000, 1)])


@pytest.mark.parametrize(
    ("layout", "message"),
    [
        ([(0, 0x10000, 4, VIRTQ_DESC_F_NEXT, 0)], "loop"),
        ([(0, 0x10000, 4, VIRTQ_DESC_F_NEXT, SIZE)], "outside a table"),
        ([(0, RAM_SIZE - 2, 4, 0, 0)], "outside RAM"),
        ([(0, 0x10000, 0xFFFF_FFFF, 0, 0)], "outside RAM"),
        (
            [(0, 0x10000, 4, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, 1), (1, 0x11000, 4, 0, 0)],
            "readable buffer after a writable",
        ),
        ([(0, 0x5000, 24, VIRTQ_DESC_F_INDIRECT, 0)], "multiple of 16"),
        ([(0, 0x5000, 0, VIRTQ_DESC_F_INDIRECT, 0)], "multiple of 16"),
        ([(0, 0x5000, 16, VIRTQ_DESC_F_INDIRECT | VIRTQ_DESC_F_NEXT, 1)], "NEXT"),
        ([(0, RAM_SIZE - 16, 32, VIRTQ_DESC_F_INDIRECT, 0)], "indirect table"),
    ],
)
def test_hostile_chains_raise_virtqueue_error(memory, layout, message):
    queue = make_queue(memory)
    for slot, address, length, flags, next_slot in layout:
        descriptor(memory, DESC, slot, address, length, flags, next_slot)
    make_available(memory, [0])
    with pytest.raises(VirtqueueError, match=message):
        queue.pop()


def test_nested_indirect_and_unnegotiated_indirect_are_refused(memory):
    table = 0x5000
    descriptor(memory, table, 0, 0x6000, 16, VIRTQ_DESC_F_INDIRECT)
    descriptor(memory, DESC, 0, table, 16, VIRTQ_DESC_F_INDIRECT)
    make_available(memory, [0])
    with pytest.raises(VirtqueueError, match="inside an indirect table"):
        make_queue(memory).pop()
    with pytest.raises(VirtqueueError, match="without VIRTIO_F_INDIRECT_DESC"):
        make_queue(memory, indirect=False).pop()


def test_a_loop_inside_an_indirect_table_ends(memory):
    table = 0x5000
    descriptor(memory, table, 0, 0x10000, 4, VIRTQ_DESC_F_NEXT, 1)
    descriptor(memory, table, 1, 0x10000, 4, VIRTQ_DESC_F_NEXT, 0)
    descriptor(memory, DESC, 0, table, 32, VIRTQ_DESC_F_INDIRECT)
    make_available(memory, [0])
    with pytest.raises(VirtqueueError, match="longer than the queue"):
        make_queue(memory).pop()


def test_head_index_out_of_range_and_absurd_available_index(memory):
    queue = make_queue(memory)
    make_available(memory, [SIZE + 3])
    with pytest.raises(VirtqueueError, match="outside a table"):
        queue.pop()
    queue = make_queue(memory)
    memory.write_u16(AVAIL + 2, SIZE + 1)
    with pytest.raises(VirtqueueError, match="claimed"):
        queue.pop()


def test_activation_refuses_bad_sizes_alignment_and_rings_outside_ram(memory):
    queue = Virtqueue(memory, SIZE)
    queue.descriptor_table, queue.available_ring, queue.used_ring = DESC, AVAIL, USED
    queue.size = 6
    with pytest.raises(VirtqueueError, match="power of two"):
        queue.activate(False, False)
    queue.size = SIZE
    queue.descriptor_table = DESC + 8
    with pytest.raises(VirtqueueError, match="aligned"):
        queue.activate(False, False)
    queue.descriptor_table = DESC
    queue.available_ring = AVAIL + 1
    with pytest.raises(VirtqueueError, match=r"available ring .* not 2-byte aligned"):
        queue.activate(False, False)
    queue.available_ring = AVAIL
    queue.used_ring = RAM_SIZE - 8
    with pytest.raises(VirtqueueError, match="used ring"):
        queue.activate(False, False)
    assert not queue.active
    with pytest.raises(ValueError):
        Virtqueue(memory, 3)
    memory.close()  # would raise BufferError if a failed activation had kept a ring view


def test_reset_releases_ring_views_so_guest_memory_can_close(memory):
    queue = make_queue(memory)
    queue.reset()
    assert (queue.active, queue.descriptor_table, queue.size) == (False, 0, SIZE)
    memory.close()


def test_push_writes_used_elements_and_index(memory):
    queue = make_queue(memory)
    queue.push(5, 512)
    queue.push(2, 1)
    assert memory.read_u16(USED + 2) == 2
    assert struct.unpack("<IIII", memory.read(USED + 4, 16)) == (5, 512, 2, 1)


def test_interrupt_suppression_without_event_index(memory):
    queue = make_queue(memory)
    assert not queue.needs_interrupt()
    queue.push(0, 1)
    assert queue.needs_interrupt()
    memory.write_u16(AVAIL, VIRTQ_AVAIL_F_NO_INTERRUPT)
    queue.push(1, 1)
    assert not queue.needs_interrupt()


def test_event_index_interrupts_only_when_used_event_is_crossed(memory):
    queue = make_queue(memory, event_index=True)
    memory.write_u16(AVAIL + 4 + 2 * SIZE, 1)
    queue.push(0, 1)
    assert not queue.needs_interrupt()
    queue.push(1, 1)
    assert queue.needs_interrupt()
    queue.push(2, 1)
    assert not queue.needs_interrupt()


def test_notification_suppression_flag_and_avail_event(memory):
    queue = make_queue(memory)
    queue.disable_notifications()
    assert memory.read_u16(USED) == VIRTQ_USED_F_NO_NOTIFY
    assert queue.enable_notifications() is False
    assert memory.read_u16(USED) == 0
    queue = make_queue(memory, event_index=True)
    descriptor(memory, DESC, 0, 0x10000, 4)
    make_available(memory, [0])
    assert queue.enable_notifications() is True
    queue.pop()
    assert queue.enable_notifications() is False
    assert memory.read_u16(USED + 4 + 8 * SIZE) == 1


@pytest.mark.parametrize("event_index", [True, False])
def test_a_full_barrier_separates_publishing_from_rereading_the_driver(
    memory, monkeypatch, event_index
):
    """x86 may let a load pass an earlier store: after the device publishes avail_event (or
    clears NO_NOTIFY) it must fence before it re-reads avail.idx, or it and the driver can both
    miss each other's update and the queue stalls. The fake barrier checks the store is done,
    then plays the driver's racing post, which the device must see."""
    from kvmlet.virtio import queue as queue_module

    queue = make_queue(memory, event_index=event_index)
    fences = []

    def barrier():
        if event_index:
            fences.append(("enable", memory.read_u16(USED + 4 + 8 * SIZE)))
        else:
            fences.append(("enable", memory.read_u16(USED)))
        make_available(memory, [0], start=0)  # the driver posts meanwhile

    monkeypatch.setattr(queue_module, "full_barrier", barrier)
    queue.disable_notifications()
    assert queue.enable_notifications(), "the post after the fence is seen"
    assert fences == [("enable", 0)]


def test_a_full_barrier_separates_the_used_index_from_used_event(memory, monkeypatch):
    from kvmlet.virtio import queue as queue_module

    queue = make_queue(memory, event_index=True)
    seen = []
    monkeypatch.setattr(
        queue_module, "full_barrier", lambda: seen.append(memory.read_u16(USED + 2))
    )
    queue.push(0, 0)
    queue.needs_interrupt()
    assert seen == [1], "the used index is published before used_event is read"
