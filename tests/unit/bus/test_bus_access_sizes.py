"""Size and byte-order adaptation: what the guest sees and what the handler is asked."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvmlet.bus import AccessSizes, AddressSpace, Endian, IoRegion

BASE = 0x100


class WordRegisters:
    """Registers of `width` bytes; records every handler call to check the widths asked."""

    def __init__(self, count: int, width: int) -> None:
        self.width = width
        self.values = [0] * count
        self.calls: list[tuple[str, int, int]] = []

    def read(self, offset: int, size: int) -> int:
        self.calls.append(("read", offset, size))
        assert size == self.width and offset % size == 0
        return self.values[offset // size]

    def write(self, offset: int, size: int, value: int) -> None:
        self.calls.append(("write", offset, size))
        assert size == self.width and offset % size == 0
        assert 0 <= value < 1 << (8 * size)
        self.values[offset // size] = value


def image(device: WordRegisters, order: str) -> bytes:
    """The bytes a guest sees: each register in the device's byte order."""
    return b"".join(value.to_bytes(device.width, order) for value in device.values)


def place(endian: Endian, width: int = 4, count: int = 2) -> tuple[AddressSpace, WordRegisters]:
    space = AddressSpace("t", 0x1000)
    device = WordRegisters(count, width)
    region = IoRegion(
        "regs",
        width * count,
        device,
        endian=endian,
        valid=AccessSizes(1, 8, unaligned=True),
        impl=AccessSizes(width, width),
    )
    space.root.add_subregion(BASE, region)
    return space, device


@pytest.mark.parametrize("endian", [Endian.BIG, Endian.LITTLE])
@pytest.mark.parametrize("size", [1, 2, 4, 8])
def test_reads_at_every_offset_match_hardware(endian, size):
    space, device = place(endian)
    device.values = [0x11223344, 0x55667788]
    memory = image(device, endian.byteorder) + b"\xff" * 8
    for offset in range(8):
        expected = int.from_bytes(memory[offset : offset + size], "little")
        assert space.read(BASE + offset, size) == expected, (offset, size)


def test_big_endian_dword_read_is_byte_swapped():
    space, device = place(Endian.BIG)
    device.values = [0x11223344, 0]
    assert space.read(BASE, 4) == 0x44332211
    assert space.read(BASE, 1) == 0x11
    assert space.read(BASE + 3, 1) == 0x44


@given(
    endian=st.sampled_from([Endian.BIG, Endian.LITTLE]),
    width=st.sampled_from([1, 2, 4, 8]),
    offset=st.integers(0, 15),
    size=st.sampled_from([1, 2, 4, 8]),
    value=st.integers(0, (1 << 64) - 1),
    initial=st.lists(st.integers(0, 255), min_size=16, max_size=16),
)
def test_writes_modify_exactly_the_bytes_written(endian, width, offset, size, value, initial):
    space, device = place(endian, width, 16 // width)
    order = endian.byteorder
    device.values = [
        int.from_bytes(bytes(initial[i : i + width]), order) for i in range(0, 16, width)
    ]
    expected = bytearray(initial)
    data = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
    for index, byte in enumerate(data):
        if offset + index < 16:
            expected[offset + index] = byte
    space.write(BASE + offset, size, value)
    assert image(device, order) == bytes(expected)


def test_wide_access_is_split_and_narrow_one_widened():
    space, device = place(Endian.LITTLE, width=2, count=4)
    space.read(BASE, 8)
    assert device.calls == [("read", 0, 2), ("read", 2, 2), ("read", 4, 2), ("read", 6, 2)]
    device.calls.clear()
    space.write(BASE + 3, 1, 0xAA)
    assert device.calls == [("read", 2, 2), ("write", 2, 2)]
    assert device.values[1] == 0xAA00


def test_access_straddling_two_regions_is_split_between_them():
    space = AddressSpace("t", 0x100)
    first, second = WordRegisters(1, 4), WordRegisters(1, 4)
    first.values, second.values = [0x44332211], [0x88776655]
    for base, device, name in ((0x10, first, "a"), (0x14, second, "b")):
        region = IoRegion(name, 4, device, valid=AccessSizes(1, 8, True), impl=AccessSizes(4, 4))
        space.root.add_subregion(base, region)
    assert space.read(0x12, 4) == 0x66554433
    space.write(0x12, 4, 0xDDCCBBAA)
    assert first.values == [0xBBAA2211]
    assert second.values == [0x8877DDCC]


def test_unaligned_impl_gets_the_access_as_is():
    space = AddressSpace("t", 0x100)
    calls = []

    class Any:
        def read(self, offset, size):
            calls.append((offset, size))
            return 0

        def write(self, offset, size, value):
            calls.append((offset, size))

    region = IoRegion("u", 16, Any(), valid=AccessSizes(1, 4, True), impl=AccessSizes(1, 4, True))
    space.root.add_subregion(0, region)
    space.read(3, 2)
    space.read(5, 4)
    assert calls == [(3, 2), (5, 4)]


@given(
    layout=st.lists(
        st.tuples(st.sampled_from([Endian.BIG, Endian.LITTLE]), st.sampled_from([1, 2, 4, 8])),
        min_size=1,
        max_size=3,
    ),
    gap=st.integers(0, 4),
    start=st.integers(0, 40),
    size=st.sampled_from([1, 2, 4, 8]),
    value=st.integers(0, (1 << 64) - 1),
)
def test_reads_and_writes_across_regions_and_gaps_match_a_byte_image(
    layout, gap, start, size, value
):
    """Regions of 8 bytes each (random byte order and handler width), `gap` bytes apart: any
    access reads the bytes of their images (0xFF in gaps) and writes only its own bytes."""
    space = AddressSpace("t", 0x100)
    devices = []
    position = 0
    for index, (endian, width) in enumerate(layout):
        device = WordRegisters(8 // width, width)
        device.values = [(index + 1) * 0x0101010101010101 & ((1 << (8 * width)) - 1)] * (8 // width)
        region = IoRegion(
            f"r{index}",
            8,
            device,
            endian=endian,
            valid=AccessSizes(1, 8, unaligned=True),
            impl=AccessSizes(width, width),
        )
        space.root.add_subregion(position, region)
        devices.append((device, endian.byteorder, position))
        position += 8 + gap

    def memory() -> bytes:
        line = bytearray(b"\xff" * 64)
        for device, order, base in devices:
            line[base : base + 8] = image(device, order)
        return bytes(line)

    before = memory()
    assert space.read(start, size) == int.from_bytes(before[start : start + size], "little")
    space.write(start, size, value)
    expected = bytearray(before)
    data = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
    for index, byte in enumerate(data):
        address = start + index
        if any(base <= address < base + 8 for _, _, base in devices):
            expected[address] = byte
    assert memory() == bytes(expected)
