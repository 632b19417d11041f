"""The register helper: declared registers, guest write rules, partial and wide accesses, and
a hypothesis check against a byte-by-byte model of the rules."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvmlet.bus import AccessSizes, IoRegion, port_io_space
from kvmlet.devices import Register, RegisterBlock


def block(*registers: Register, size: int = 0x20) -> RegisterBlock:
    return RegisterBlock(size, registers)


def test_plain_read_only_and_masked_registers():
    registers = block(
        Register("id", 0x0, value=0x1234_5678, read_only=True),
        Register("scratch", 0x4),
        Register("control", 0x8, width=2, writable=0x00FF),
    )
    registers.write(0x0, 4, 0)
    registers.write(0x4, 4, 0xDEAD_BEEF)
    registers.write(0x8, 2, 0xABCD)
    assert registers.read(0x0, 4) == 0x1234_5678
    assert registers["scratch"] == 0xDEAD_BEEF
    assert registers.read(0x8, 2) == 0x00CD


def test_w1c_bits_clear_only_where_a_one_is_written():
    registers = block(Register("status", 0x0, value=0b1111, read_only=True, w1c=0b0110))
    registers.write(0x0, 4, 0b0010)
    assert registers["status"] == 0b1101
    registers.write(0x0, 4, 0b1001)  # bits 0 and 3 are not W1C: unchanged
    assert registers["status"] == 0b1101


def test_by_default_every_bit_but_the_w1c_ones_is_writable():
    registers = block(Register("status", 0x0, value=0b11, w1c=0b01))
    registers.write(0x0, 4, 0b00)  # writing 0 to a W1C bit leaves it; bit 1 is plain
    assert registers["status"] == 0b01
    registers.write(0x0, 4, 0b11)
    assert registers["status"] == 0b10


def test_a_partial_write_leaves_the_other_bytes_and_their_w1c_bits():
    registers = block(Register("status", 0x0, value=0xFF00_FF00, w1c=0xFFFF_FFFF))
    registers.write(0x1, 1, 0xFF)  # clears byte 1 only
    assert registers["status"] == 0xFF00_0000
    written = []
    registers = block(Register("data", 0x0, value=0x1122_3344, on_write=written.append))
    registers.write(0x2, 2, 0xAABB)
    assert registers["data"] == 0xAABB_3344
    assert written == [0xAABB_3344]  # the whole register as the guest's write left it


def test_wide_and_straddling_accesses_are_served_byte_by_byte():
    registers = block(Register("low", 0x0, width=2, value=0x1111), Register("high", 0x2, width=2))
    registers.write(0x0, 4, 0x2222_3333)
    assert (registers["low"], registers["high"]) == (0x3333, 0x2222)
    assert registers.read(0x1, 2) == 0x2233
    assert registers.read(0x0, 8) == 0x2222_3333  # bytes 4-7 belong to no register: 0
    registers.write(0x4, 4, 0xFFFF_FFFF)  # ignored
    assert registers.read(0x4, 4) == 0


def test_on_read_computes_the_value_once_per_access():
    calls = []

    def counter() -> int:
        calls.append(1)
        return 0xAABB_CCDD

    registers = block(Register("counter", 0x0, on_read=counter))
    assert registers.read(0x0, 4) == 0xAABB_CCDD
    assert registers.read(0x1, 2) == 0xBBCC
    assert len(calls) == 2


def test_device_side_setters_ignore_the_guest_rules():
    registers = block(Register("status", 0x0, width=1, read_only=True))
    registers["status"] = 0x1FF
    assert registers["status"] == 0xFF
    registers.clear_bits("status", 0x0F)
    registers.set_bits("status", 0x01)
    assert registers["status"] == 0xF1
    registers.reset()
    assert registers["status"] == 0


@pytest.mark.parametrize(
    ("registers", "message"),
    [
        ((Register("a", 0), Register("a", 4)), "two registers are named"),
        ((Register("a", 0), Register("b", 2, width=2)), "overlaps a"),
        ((Register("a", 0x20, width=8),), "ends past"),
    ],
)
def test_inconsistent_declarations_are_refused(registers, message):
    with pytest.raises(ValueError, match=message):
        RegisterBlock(0x20, registers)


def test_registers_must_be_aligned_to_their_width():
    with pytest.raises(ValueError, match="not 4-aligned"):
        Register("a", 2)
    with pytest.raises(ValueError, match="width 3"):
        Register("a", 0, width=3)


def test_on_the_bus_the_guest_gets_the_declared_widths():
    space = port_io_space()
    registers = block(Register("wide", 0x8, width=8, value=0x0102_0304_0506_0708))
    assert registers.valid == AccessSizes(1, 8)
    region = IoRegion("regs", 0x20, registers, valid=registers.valid, impl=registers.impl)
    space.root.add_subregion(0x100, region)
    assert space.read(0x108, 8) == 0x0102_0304_0506_0708
    assert space.read(0x10B, 1) == 0x05
    space.write(0x10C, 4, 0xAAAA_AAAA)
    assert registers["wide"] == 0xAAAA_AAAA_0506_0708


# -- against a byte-by-byte model --------------------------------------------------------------

LAYOUT = (
    Register("a", 0x0, value=0x8844_2211, w1c=0x0F0F_0000, writable=0xF0F0_FFFF),
    Register("b", 0x4, width=2, value=0xBEEF, read_only=True, w1c=0x00FF),
    Register("c", 0x8, width=8, value=0x0123_4567_89AB_CDEF),
    Register("d", 0x10, width=1, value=0x5A),
)


class ByteModel:
    """Each byte: value, writable mask, W1C mask (0 for bytes no register covers)."""

    def __init__(self):
        self.values = bytearray(0x18)
        self.writable = bytearray(0x18)
        self.w1c = bytearray(0x18)
        for register in LAYOUT:
            for index in range(register.width):
                at = register.offset + index
                self.values[at] = register.reset >> (8 * index) & 0xFF
                self.writable[at] = register.mask >> (8 * index) & 0xFF
                self.w1c[at] = register.w1c >> (8 * index) & 0xFF

    def read(self, offset, size):
        return int.from_bytes(self.values[offset : offset + size], "little")

    def write(self, offset, size, value):
        for index in range(size):
            at, byte = offset + index, value >> (8 * index) & 0xFF
            merged = (self.values[at] & ~self.writable[at]) | (byte & self.writable[at])
            self.values[at] = merged & ~(byte & self.w1c[at]) & 0xFF


accesses = st.lists(
    st.tuples(
        st.booleans(),
        st.sampled_from([1, 2, 4, 8]).flatmap(
            lambda size: st.tuples(st.just(size), st.integers(0, 0x18 - size))
        ),
        st.integers(0, (1 << 64) - 1),
    ),
    max_size=40,
)


@given(accesses)
def test_any_access_sequence_behaves_as_the_byte_model(sequence):
    registers, model = RegisterBlock(0x18, LAYOUT), ByteModel()
    for is_write, (size, offset), value in sequence:
        value &= (1 << (8 * size)) - 1
        if is_write:
            registers.write(offset, size, value)
            model.write(offset, size, value)
        else:
            assert registers.read(offset, size) == model.read(offset, size)
    assert registers.read(0, 8) == model.read(0, 8)
    assert registers.read(8, 8) == model.read(8, 8)
