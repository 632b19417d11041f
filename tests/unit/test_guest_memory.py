"""Guest memory: every access is bounds-checked against the RAM banks."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvmlet.errors import GuestMemoryError
from kvmlet.memory import GuestMemory

LAYOUT = [(0, 0x10000), (0x100000, 0x1000)]


@pytest.fixture
def memory():
    mem = GuestMemory.anonymous(LAYOUT)
    yield mem
    mem.close()


def test_round_trip_of_every_width(memory):
    memory.write_u8(0x10, 0xAB)
    memory.write_u16(0x20, 0xBEEF)
    memory.write_u32(0x30, 0xDEADBEEF)
    memory.write_u64(0x100008, 0x0123456789ABCDEF)
    assert memory.read_u8(0x10) == 0xAB
    assert memory.read_u16(0x20) == 0xBEEF
    assert memory.read(0x30, 4) == bytes.fromhex("efbeadde")
    assert memory.read_u64(0x100008) == 0x0123456789ABCDEF


def test_view_is_zero_copy(memory):
    view = memory.view(0x100, 4)
    view[:] = b"abcd"
    assert memory.read(0x100, 4) == b"abcd"
    view.release()


@pytest.mark.parametrize(
    ("address", "length"),
    [(0xFFFF, 2), (0x10000, 1), (0xFFFFF, 1), (0x100FFF, 2), (-1, 1), (0, -1), (0, 0x10001)],
)
def test_accesses_outside_ram_are_refused(memory, address, length):
    with pytest.raises(GuestMemoryError):
        memory.read(address, length)
    assert not memory.contains(address, length)


def test_overlapping_banks_are_refused():
    with pytest.raises(ValueError):
        GuestMemory.anonymous([(0, 0x2000), (0x1000, 0x1000)])


@given(address=st.integers(-(2**64), 2**64), length=st.integers(-10, 2**20))
def test_arbitrary_accesses_stay_inside_ram(address, length):
    mem = GuestMemory.anonymous(LAYOUT)
    try:
        inside = any(
            base <= address and address + length <= base + size and length >= 0
            for base, size in LAYOUT
        )
        if inside:
            assert len(mem.read(address, length)) == length
        else:
            with pytest.raises(GuestMemoryError):
                mem.read(address, length)
    finally:
        mem.close()
