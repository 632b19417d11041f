"""Dispatch through an address space: overlap rules, unassigned accesses, counters, tracing,
RAM regions, transactions, listeners and handler failures."""

from __future__ import annotations

import sys
import threading

import pytest

from kvmlet.bus import (
    AccessSizes,
    AddressSpace,
    ContainerRegion,
    IoRegion,
    RamRegion,
    RecordingListener,
    mmio_space,
    port_io_space,
    transaction,
)
from kvmlet.bus.flat import MEMO_LIMIT


class Registers:
    """A device that answers reads with a fixed pattern and logs every call."""

    def __init__(self, pattern: int = 0x11) -> None:
        self.pattern = pattern
        self.calls: list[tuple] = []

    def read(self, offset: int, size: int) -> int:
        self.calls.append(("read", offset, size))
        return (self.pattern * 0x0101010101010101) & ((1 << (8 * size)) - 1)

    def write(self, offset: int, size: int, value: int) -> None:
        self.calls.append(("write", offset, size, value))


def test_plain_access_reaches_handler_with_region_offset():
    space = port_io_space()
    device = Registers()
    space.root.add_subregion(0x3F8, IoRegion("uart", 8, device))
    assert space.read(0x3FD, 1) == 0x11
    space.write(0x3F9, 1, 0x5A)
    assert device.calls == [("read", 5, 1), ("write", 1, 1, 0x5A)]


def test_higher_priority_wins_then_later_insertion():
    space = AddressSpace("t", 0x100)
    low, high, late = Registers(0x01), Registers(0x02), Registers(0x03)
    space.root.add_subregion(0x10, IoRegion("high", 0x10, high), priority=1)
    space.root.add_subregion(0x00, IoRegion("low", 0x40, low))
    assert space.read(0x10, 1) == 0x02
    assert space.read(0x20, 1) == 0x01
    space.root.add_subregion(0x18, IoRegion("late", 0x10, late))
    assert space.read(0x18, 1) == 0x02
    assert space.read(0x20, 1) == 0x03
    assert space.read(0x28, 1) == 0x01


def test_container_clips_subregions_and_is_transparent_in_gaps():
    space = AddressSpace("t", 0x100)
    under = Registers(0x0A)
    space.root.add_subregion(0, IoRegion("under", 0x100, under), priority=-1)
    container = ContainerRegion("window", 0x20)
    space.root.add_subregion(0x40, container)
    container.add_subregion(0x10, IoRegion("inside", 0x40, Registers(0x0B)))
    assert space.read(0x40, 1) == 0x0A
    assert space.read(0x50, 1) == 0x0B
    assert space.read(0x5F, 1) == 0x0B
    assert space.read(0x60, 1) == 0x0A


def test_region_with_subregions_shows_beneath_them():
    space = AddressSpace("t", 0x100)
    outer = IoRegion("outer", 0x20, Registers(0x0C))
    outer.add_subregion(0x8, IoRegion("inner", 4, Registers(0x0D)))
    space.root.add_subregion(0x20, outer)
    assert [space.read(0x20 + i, 1) for i in (7, 8, 11, 12)] == [0x0C, 0x0D, 0x0D, 0x0C]


def test_move_disable_enable_and_remove():
    space = AddressSpace("t", 0x100)
    region = IoRegion("dev", 4, Registers(0x22))
    space.root.add_subregion(0x10, region)
    region.move(0x40)
    assert space.read(0x10, 1) == 0xFF
    assert space.read(0x40, 1) == 0x22
    region.disable()
    assert space.read(0x40, 1) == 0xFF
    region.enable()
    assert space.read(0x40, 1) == 0x22
    space.root.remove_subregion(region)
    assert space.view.assigned() == []


def test_remembered_addresses_follow_a_rebuild():
    space = AddressSpace("t", 0x100)
    region = IoRegion("dev", 4, Registers(0x22))
    space.root.add_subregion(0x10, region)
    assert space.read(0x10, 1) == 0x22
    region.move(0x20)
    assert space.read(0x10, 1) == 0xFF
    assert space.read(0x20, 1) == 0x22


def test_address_memo_is_bounded():
    space = mmio_space()
    for address in range(0, 2 * MEMO_LIMIT * 8, 8):
        space.read(address, 1)
    assert len(space.view.memo) == MEMO_LIMIT


def test_unassigned_reads_all_ones_and_counts_per_address():
    space = port_io_space()
    assert space.read(0x80, 1) == 0xFF
    assert space.read(0x80, 2) == 0xFFFF
    assert space.read(0x84, 4) == 0xFFFF_FFFF
    space.write(0x80, 1, 0)
    assert space.unassigned_reads == {0x80: 2, 0x84: 1}
    assert space.unassigned_writes == {0x80: 1}
    assert space.unassigned_total == 4


def test_access_beyond_the_space_is_unassigned():
    space = port_io_space()
    top = IoRegion("top", 4, Registers(0x33), valid=AccessSizes(1, 4, unaligned=True))
    space.root.add_subregion(0xFFFC, top)
    assert space.read(0xFFFE, 4) == 0xFFFF_3333


def test_invalid_width_is_refused_like_unassigned():
    space = AddressSpace("t", 0x100)
    device = Registers()
    region = IoRegion("d", 8, device, valid=AccessSizes(4, 4), impl=AccessSizes(4, 4))
    space.root.add_subregion(0, region)
    assert space.read(0, 1) == 0xFF
    assert space.read(2, 4) == 0xFFFF_FFFF
    space.write(0, 2, 0)
    assert device.calls == []
    assert space.invalid_accesses == 3
    with pytest.raises(ValueError):
        space.read(0, 9)


def test_counters_and_trace_hook():
    space = AddressSpace("t", 0x100)
    region = IoRegion("d", 8, Registers())
    space.root.add_subregion(0x10, region)
    traced = []
    space.trace = lambda *event: traced.append(event)
    space.read(0x10, 4)
    space.write(0x12, 2, 0xBEEF)
    space.read(0x90, 1)
    assert region.counters() == {"reads": 1, "writes": 1, "bytes_read": 4, "bytes_written": 2}
    assert traced == [
        ("t", 0x10, 4, False, 0x11111111, "d"),
        ("t", 0x12, 2, True, 0xBEEF, "d"),
        ("t", 0x90, 1, False, 0xFF, None),
    ]
    assert space.stats()["regions"] == {"d": region.counters()}


def test_failing_handler_reads_all_ones_and_is_counted():
    class Broken:
        def read(self, offset, size):
            raise RuntimeError("device bug")

        def write(self, offset, size, value):
            raise RuntimeError("device bug")

    space = AddressSpace("t", 0x100)
    space.root.add_subregion(0, IoRegion("broken", 8, Broken(), impl=AccessSizes(4, 4)))
    assert space.read(0, 4) == 0xFFFF_FFFF
    assert space.read(2, 2) == 0xFFFF
    space.write(0, 4, 1)
    assert space.handler_errors == 3


def test_a_handler_failing_on_every_access_is_counted_not_logged_each_time(caplog):
    """A device bug the guest can hit in a loop: the first failures are logged with their
    traceback, then only counted."""

    class Broken:
        def read(self, offset, size):
            raise RuntimeError("device bug")

        def write(self, offset, size, value):
            raise RuntimeError("device bug")

    space = AddressSpace("t", 0x100)
    space.root.add_subregion(0, IoRegion("broken", 8, Broken(), impl=AccessSizes(4, 4)))
    caplog.set_level("ERROR", logger="kvmlet.bus")
    for _ in range(1000):
        space.read(0, 4)
        space.write(2, 2, 1)
    assert space.handler_errors == 2000
    assert 1 <= len(caplog.records) <= 11
    assert caplog.records[0].exc_info is not None, "the first ones carry the traceback"


def test_handler_runs_under_the_region_lock_unless_lock_free():
    seen = []

    class Probe:
        def __init__(self):
            self.region = None

        def read(self, offset, size):
            seen.append(self.region.lock.locked() if self.region.lock else None)
            return 0

        def write(self, offset, size, value):
            pass

    space = AddressSpace("t", 0x100)
    locked, free = Probe(), Probe()
    locked.region = IoRegion("locked", 4, locked)
    free.region = IoRegion("free", 4, free, lock=None)
    space.root.add_subregion(0, locked.region)
    space.root.add_subregion(8, free.region)
    space.read(0, 4)
    space.read(1, 1)
    space.read(8, 4)
    assert seen == [True, True, None]


@pytest.mark.parametrize("shared", [False, True])
def test_the_region_lock_serialises_concurrent_handlers(shared):
    """One vCPU is inside a handler; another vCPU's access to the same region (or to another
    region sharing its lock) must wait until the first one leaves: deterministic, the first
    handler does not return before the second access had its chance to overlap."""
    first_inside, second_inside, leave = (threading.Event() for _ in range(3))

    class Registers:
        def read(self, offset, size):
            if offset == 0:
                first_inside.set()
                leave.wait(5)
            else:
                second_inside.set()
            return 0

        def write(self, offset, size, value):
            pass

    space = AddressSpace("t", 0x100)
    lock = threading.Lock()
    if shared:
        space.root.add_subregion(0, IoRegion("a", 4, Registers(), lock=lock))
        space.root.add_subregion(4, IoRegion("b", 4, Offset4(Registers()), lock=lock))
    else:
        space.root.add_subregion(0, IoRegion("a", 8, Registers()))
    first = threading.Thread(target=space.read, args=(0, 4))
    first.start()
    assert first_inside.wait(5)
    second = threading.Thread(target=space.read, args=(4, 4))
    second.start()
    overlapped = second_inside.wait(0.3)
    leave.set()
    first.join()
    second.join()
    assert not overlapped, "two handlers ran at once under one lock"
    assert second_inside.is_set()


class Offset4:
    """Shifts a device's offsets by 4, so region b's offset 0 is the device's offset 4."""

    def __init__(self, device):
        self.device = device

    def read(self, offset, size):
        return self.device.read(offset + 4, size)

    def write(self, offset, size, value):
        self.device.write(offset + 4, size, value)


def test_ram_region_serves_exits_and_respects_readonly():
    space = mmio_space()
    backing = bytearray(range(16))
    ram = RamRegion("rom", 16, backing, readonly=True)
    space.root.add_subregion(0xF0000, ram)
    assert space.read(0xF0001, 4) == 0x04030201
    space.write(0xF0000, 8, 0)
    assert backing[:8] == bytes(range(8))
    ram.set_readonly(False)
    space.write(0xF0000, 2, 0xAABB)
    assert backing[:2] == b"\xbb\xaa"


def test_transaction_rebuilds_once():
    space = AddressSpace("t", 0x1000)
    before = space.rebuilds
    with transaction():
        for index in range(10):
            space.root.add_subregion(index * 0x10, IoRegion(f"r{index}", 8, Registers()))
        assert space.view.assigned() == []
    assert space.rebuilds == before + 1
    assert len(space.view.assigned()) == 10


def test_listener_gets_ram_sections_diff_and_late_replay():
    space = mmio_space()
    low = RamRegion("low", 0x1000, bytearray(0x1000))
    space.root.add_subregion(0, low)
    listener = RecordingListener()
    space.add_listener(listener)
    assert [(s.start, s.size, s.region) for s in listener.sections] == [(0, 0x1000, low)]
    hole = IoRegion("hole", 0x100, Registers())
    space.root.add_subregion(0x400, hole, priority=1)
    assert sorted((s.start, s.size, s.region_offset) for s in listener.sections) == [
        (0, 0x400, 0),
        (0x500, 0xB00, 0x500),
    ]
    kinds = [kind for kind, _ in listener.events]
    assert kinds == ["region_added", "region_removed", "region_added", "region_added"]
    late = RecordingListener()
    space.add_listener(late)
    assert late.sections == listener.sections


def test_describe_shows_tree_and_flat_view():
    space = AddressSpace("t", 0x100)
    region = IoRegion("dev", 0x10, Registers())
    space.root.add_subregion(0x20, region, priority=2)
    hidden = IoRegion("hidden", 0x10, Registers())
    space.root.add_subregion(0x40, hidden)
    hidden.disable()
    text = space.describe().splitlines()
    assert "    0x0000000020-0x000000002f (prio 2, IoRegion): dev" in text
    assert "    0x0000000040-0x000000004f (prio 0, IoRegion): hidden [disabled]" in text
    assert text[-1] == "  0x0000000020-0x000000002f dev +0x0"


def test_region_cannot_be_placed_twice():
    space = AddressSpace("t", 0x100)
    region = IoRegion("d", 4, Registers())
    space.root.add_subregion(0, region)
    with pytest.raises(ValueError):
        space.root.add_subregion(8, region)


def test_dispatch_while_another_thread_moves_the_region():
    offsets_seen = set()

    class Checked:
        def read(self, offset, size):
            offsets_seen.add(offset)
            return 0x42

        def write(self, offset, size, value):
            pass

    space = mmio_space()
    region = IoRegion("moving", 0x10, Checked())
    space.root.add_subregion(0x1000, region)
    stop = threading.Event()

    def mover():
        while not stop.is_set():
            with transaction():
                region.move(0x2000 if region.offset == 0x1000 else 0x1000)
                region.disable()
            region.enable()

    switch_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    thread = threading.Thread(target=mover)
    thread.start()
    try:
        results = [space.read(address, 1) for _ in range(5000) for address in (0x1008, 0x2008)]
    finally:
        stop.set()
        thread.join()
        sys.setswitchinterval(switch_interval)
    # Whatever the interleaving: a read hits the region at its register or nothing at all.
    assert set(results) <= {0x42, 0xFF}
    assert offsets_seen <= {8}
    assert space.handler_errors == 0
    final = 0x1008 if region.offset == 0x1000 else 0x2008  # the mover ends with the region on
    assert space.read(final, 1) == 0x42
    assert offsets_seen == {8}
