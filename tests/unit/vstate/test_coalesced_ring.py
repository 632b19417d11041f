"""The coalesced-write ring replayed through the bus, without KVM: a page laid out as KVM lays
it out, a fake VM that records zone (un)registrations."""

from __future__ import annotations

import struct

from hypothesis import given
from hypothesis import strategies as st

from kvmlet.bus import AccessSizes, IoRegion, mmio_space, port_io_space
from kvmlet.vstate.coalesced_io import ENTRY, RING_ENTRIES, RING_HEADER, CoalescedRing


class FakeVm:
    def __init__(self):
        self.calls: list[tuple] = []

    def register_coalesced_zone(self, address, size, *, pio):
        self.calls.append(("register", address, size, pio))

    def unregister_coalesced_zone(self, address, size, *, pio):
        self.calls.append(("unregister", address, size, pio))


class FakeVcpu:
    def __init__(self):
        self.run_page = memoryview(bytearray(3 * 4096))


class Recorder:
    def __init__(self, log, name):
        self.log, self.name = log, name

    def read(self, offset, size):
        return 0

    def write(self, offset, size, value):
        self.log.append((self.name, offset, size, value))


def ring_with_devices():
    io, mmio = port_io_space(), mmio_space()
    log: list[tuple] = []
    any_width = AccessSizes(1, 8)
    io.root.add_subregion(0x80, IoRegion("post", 8, Recorder(log, "post"), impl=any_width))
    mmio.root.add_subregion(0x1000, IoRegion("reg", 16, Recorder(log, "reg"), impl=any_width))
    vm, vcpu = FakeVm(), FakeVcpu()
    ring = CoalescedRing(vm, io, mmio)
    ring.map_from(vcpu, 2)
    return ring, vcpu.run_page[2 * 4096 :], log, vm


def produce(page, entries):
    """What KVM does: append (address, length, pio, data) entries at `last`."""
    _, last = RING_HEADER.unpack_from(page)
    for address, length, pio, data in entries:
        ENTRY.pack_into(page, RING_HEADER.size + last * ENTRY.size, address, length, pio, data)
        last = (last + 1) % RING_ENTRIES
    struct.pack_into("<I", page, 4, last)


def test_drain_replays_port_and_mmio_writes_in_order_and_frees_the_ring():
    ring, page, log, _ = ring_with_devices()
    produce(page, [(0x80, 1, 1, b"\x55"), (0x1004, 4, 0, b"\x78\x56\x34\x12"), (0x82, 2, 1, b"ab")])
    assert ring.header[0] != ring.header[1]
    ring.drain()
    assert log == [("post", 0, 1, 0x55), ("reg", 4, 4, 0x12345678), ("post", 2, 2, 0x6261)]
    assert ring.header[0] == ring.header[1] == 3
    assert ring.drained == 3


def test_drain_follows_the_ring_around_its_end_and_skips_impossible_lengths():
    ring, page, log, _ = ring_with_devices()
    start = RING_ENTRIES - 2
    struct.pack_into("<II", page, 0, start, start)
    produce(
        page, [(0x80, 1, 1, bytes([n])) for n in range(3)] + [(0x80, 0, 1, b""), (0x80, 9, 1, b"")]
    )
    ring.drain()
    assert [entry[3] for entry in log] == [0, 1, 2]
    assert ring.header[0] == ring.header[1] == 3


@given(st.lists(st.integers(0, 255), max_size=RING_ENTRIES - 1))
def test_every_write_kvm_queued_is_replayed_once(values):
    ring, page, log, _ = ring_with_devices()
    produce(page, [(0x80, 1, 1, bytes([value])) for value in values])
    ring.drain()
    ring.drain()
    assert [entry[3] for entry in log] == values


def test_zones_register_once_and_unregistering_drains_first():
    ring, page, log, vm = ring_with_devices()
    ring.set_zone(0x3F8, 1, pio=True, enabled=True)
    ring.set_zone(0x3F8, 1, pio=True, enabled=True)
    produce(page, [(0x80, 1, 1, b"\x01")])
    ring.set_zone(0x3F8, 1, pio=True, enabled=False)
    ring.set_zone(0x3F8, 1, pio=True, enabled=False)
    assert vm.calls == [("register", 0x3F8, 1, True), ("unregister", 0x3F8, 1, True)]
    assert log == [("post", 0, 1, 1)]


def test_an_unmapped_or_closed_ring_has_nothing_to_drain():
    io, mmio = port_io_space(), mmio_space()
    ring = CoalescedRing(FakeVm(), io, mmio)
    assert ring.header[0] == ring.header[1]
    ring.drain()
    ring.map_from(FakeVcpu(), 2)
    ring.close()
    assert ring.header[0] == ring.header[1]
    ring.close()  # twice: nothing left to release
