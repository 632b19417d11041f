"""The flat view's lookup: the entry for an address is its range's, by whichever road (the
address memo, the page index, a bisect), and a plain access always takes the fast path."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from kvmlet.bus import AccessSizes, AddressSpace, IoRegion, RamRegion, mmio_space


class Registers:
    def read(self, offset, size):
        return offset

    def write(self, offset, size, value):
        pass


def mixed_space() -> AddressSpace:
    """RAM (larger than any page index holds), 4 KiB device pages back to back, and a BAR cut
    into sub-page parts with gaps, as virtio-pci lays one out."""
    space = mmio_space()
    with space.transaction():
        space.root.add_subregion(0, RamRegion("ram", 1 << 20, bytearray(1 << 20)))
        for index in range(8):
            region = IoRegion(f"page{index}", 0x1000, Registers(), impl=AccessSizes(4, 4))
            space.root.add_subregion(0xC000_0000 + 0x1000 * index, region)
        for index, (offset, size) in enumerate([(0, 0x38), (0x1000, 4), (0x3000, 8), (0x3010, 4)]):
            part = IoRegion(f"part{index}", size, Registers(), impl=AccessSizes(1, 4))
            space.root.add_subregion(0xD000_0000 + offset, part)
    return space


def test_every_range_start_finds_its_own_range():
    view = mixed_space().view
    for start, end, region, _ in view.ranges:
        for address in {start, end - 1}:
            entry = view.entry_for(address)
            assert entry[0] == end and entry[-1] is region, hex(address)


def test_a_plain_access_at_any_range_start_takes_the_fast_path(monkeypatch):
    space = mixed_space()

    def general_path(*args):
        raise AssertionError("the general path served a plain access")

    monkeypatch.setattr(space, "_access", general_path)
    for flat in space.view.assigned():
        if flat.region.name.startswith(("page", "part")):
            assert space.read(flat.start, 4) == 0
            space.write(flat.start, 4, 1)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(-(1 << 20), (1 << 64) + (1 << 20)), max_size=50))
def test_the_lookup_agrees_with_the_ranges_everywhere(addresses):
    view = mixed_space().view
    probes = addresses + [0xC000_0000 + 0x800 * n for n in range(20)] + [0xD000_3008]
    for address in probes:
        _, end, region, _ = view.range_at(address)
        entry = view.entry_for(address)
        assert entry[0] == end and entry[-1] is region, hex(address)


def test_an_access_past_the_register_range_of_an_indexed_page_is_unassigned():
    """The page index gives the register range at a page's start for the whole page; accesses
    beyond that range still read all-ones and count as unassigned."""
    space = mixed_space()
    assert space.read(0xD000_0000, 4) == 0
    assert space.read(0xD000_0038, 4) == 0xFFFF_FFFF
    assert space.read(0xD000_0FFC, 4) == 0xFFFF_FFFF
    space.write(0xD000_0800, 4, 1)
    assert space.unassigned_reads == {0xD000_0038: 1, 0xD000_0FFC: 1}
    assert space.unassigned_writes == {0xD000_0800: 1}
    assert space.read(0xD000_3010, 4) == 0, "a page two ranges share"
    assert space.read(0xD000_300C, 4) == 0xFFFF_FFFF
