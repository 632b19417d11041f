"""Guest memory: every access is bounds-checked against the RAM banks."""

import errno
import mmap

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvmlet.errors import GuestMemoryError, KvmletError
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


def host_memory_bytes() -> int:
    """RAM plus swap, from /proc/meminfo."""
    with open("/proc/meminfo") as meminfo:
        fields = dict(line.split(":", 1) for line in meminfo)
    return sum(int(fields[name].split()[0]) * 1024 for name in ("MemTotal", "SwapTotal"))


def strict_overcommit() -> bool:
    with open("/proc/sys/vm/overcommit_memory") as setting:
        return setting.read().strip() == "2"


@pytest.mark.skipif(
    strict_overcommit(),
    reason="strict overcommit (vm.overcommit_memory=2) refuses every mapping beyond the limit",
)
def test_a_bank_larger_than_the_host_costs_nothing_until_touched():
    size = 2 * host_memory_bytes() & ~0xFFFFF
    memory = GuestMemory.anonymous([(0, size)])
    try:
        memory.write(size - 4, b"last")
        assert memory.read(size - 4, 4) == b"last"
    finally:
        memory.close()


def test_a_refused_mapping_is_one_clear_error(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError(errno.ENOMEM, "Cannot allocate memory")

    monkeypatch.setattr(mmap, "mmap", refuse)
    with pytest.raises(
        KvmletError, match=r"^cannot map 2 GiB of guest RAM: cannot allocate memory$"
    ):
        GuestMemory.anonymous([(0, 2 << 30)])


def resident_pages(memory: GuestMemory, bank: int = 0) -> int:
    """Pages of a bank the host has backed: its mapping's Rss in /proc/self/smaps."""
    start = memory.banks[bank].host_address()
    with open("/proc/self/smaps") as smaps:
        inside = False
        for line in smaps:
            if "-" in line.split()[0] and not line[0].isupper():
                inside = int(line.split("-")[0], 16) == start
            elif inside and line.startswith("Rss:"):
                return int(line.split()[1]) * 1024 // mmap.PAGESIZE
    raise AssertionError("bank not found in smaps")


def test_discard_gives_pages_back_and_the_guest_then_reads_zeros():
    memory = GuestMemory.anonymous([(0, 64 * mmap.PAGESIZE)])
    try:
        memory.fill(0, 64 * mmap.PAGESIZE, 0xAB)
        before = resident_pages(memory)
        memory.discard(8 * mmap.PAGESIZE, 16 * mmap.PAGESIZE)
        assert before - resident_pages(memory) == 16
        assert memory.read(8 * mmap.PAGESIZE, 16 * mmap.PAGESIZE) == bytes(16 * mmap.PAGESIZE)
        assert memory.read_u8(8 * mmap.PAGESIZE - 1) == 0xAB
        assert memory.read_u8(24 * mmap.PAGESIZE) == 0xAB
    finally:
        memory.close()


@pytest.mark.parametrize(
    ("address", "length"),
    [(0x10000, 0x1000), (0xF000, 0x2000), (0x800, 0x1000), (0, 0x800), (0x101000, 0x1000)],
)
def test_discard_outside_ram_or_unaligned_is_refused(memory, address, length):
    memory.write(0xF000, b"kept")
    with pytest.raises(GuestMemoryError):
        memory.discard(address, length)
    assert memory.read(0xF000, 4) == b"kept"


def test_discard_of_shared_memory_punches_the_pages_out(monkeypatch):
    memory = GuestMemory.anonymous([(0, 4 * mmap.PAGESIZE)])
    advice = []
    monkeypatch.setattr(memory.banks[0], "mapping", _RecordingMapping(advice))
    memory.banks[0].shared = True
    memory.discard(mmap.PAGESIZE, mmap.PAGESIZE)
    memory.banks[0].shared = False
    memory.discard(0, mmap.PAGESIZE)
    assert advice == [
        (mmap.MADV_REMOVE, mmap.PAGESIZE, mmap.PAGESIZE),
        (mmap.MADV_DONTNEED, 0, 4096),
    ]


class _RecordingMapping:
    def __init__(self, advice):
        self.advice = advice

    def madvise(self, option, start, length):
        self.advice.append((option, start, length))
