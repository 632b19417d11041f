"""Guest memory: every access is bounds-checked against the RAM banks."""

import ctypes
import errno
import mmap
import os

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
@pytest.mark.parametrize("backing", [GuestMemory.anonymous, GuestMemory.memfd])
def test_a_bank_larger_than_the_host_costs_nothing_until_touched(backing):
    size = 2 * host_memory_bytes() & ~0xFFFFF
    memory = backing([(0, size)])
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


def test_discard_of_memfd_ram_punches_the_pages_out_of_the_file():
    """MADV_DONTNEED would only drop this mapping's pages: a peer's mapping of the memfd (a
    vhost-user backend) would still hold the data, and so would the host."""
    memory = GuestMemory.memfd([(0, 16 * mmap.PAGESIZE)])
    bank = memory.banks[0]
    peer = mmap.mmap(bank.fd, bank.size, flags=mmap.MAP_SHARED)
    try:
        memory.fill(0, 16 * mmap.PAGESIZE, 0xCD)
        memory.discard(4 * mmap.PAGESIZE, 8 * mmap.PAGESIZE)
        # Half the file's pages are gone from the host (checked first: reading a hole of a
        # shared memory file through a mapping allocates a page again).
        assert os.fstat(bank.fd).st_blocks * 512 == 8 * mmap.PAGESIZE
        assert peer[4 * mmap.PAGESIZE : 12 * mmap.PAGESIZE] == bytes(8 * mmap.PAGESIZE)
        assert peer[4 * mmap.PAGESIZE - 1] == 0xCD and peer[12 * mmap.PAGESIZE] == 0xCD
    finally:
        peer.close()
        memory.close()


def open_fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_memfd_ram_is_the_same_pages_in_another_mapping():
    memory = GuestMemory.memfd(LAYOUT)
    try:
        assert memory.shareable
        high = memory.banks[1]
        assert high.shareable and high.fd_offset == 0
        other = mmap.mmap(high.fd, high.size, flags=mmap.MAP_SHARED, offset=high.fd_offset)
        memory.write(0x100010, b"from the guest")
        assert other[0x10:0x1E] == b"from the guest"
        other[0x20:0x2B] = b"from a peer"
        assert memory.read(0x100020, 11) == b"from a peer"
        other.close()
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


def test_memfd_ram_cannot_be_truncated_by_whoever_holds_its_fd():
    memory = GuestMemory.memfd(LAYOUT)
    try:
        for bank in memory:
            with pytest.raises(PermissionError):
                os.ftruncate(bank.fd, 0)
            assert os.fstat(bank.fd).st_size == bank.size
    finally:
        memory.close()


def test_anonymous_ram_is_not_shareable(memory):
    assert not memory.shareable
    assert all(bank.fd is None for bank in memory)


def test_closing_memfd_ram_closes_its_files():
    before = open_fd_count()
    memory = GuestMemory.memfd(LAYOUT)
    fds = [bank.fd for bank in memory]
    assert open_fd_count() > before
    memory.close()
    assert open_fd_count() == before
    assert all(bank.fd is None for bank in memory)
    for fd in fds:
        with pytest.raises(OSError, match="Bad file descriptor"):
            os.fstat(fd)


@pytest.mark.parametrize("backing", [GuestMemory.anonymous, GuestMemory.memfd])
def test_host_address_is_where_this_process_sees_guest_ram(backing):
    memory = backing(LAYOUT)
    try:
        memory.write_u64(0x100008, 0x1122334455667788)
        address = memory.host_address(0x100008, 8)
        assert address == memory.banks[1].host_address() + 8
        assert ctypes.c_uint64.from_address(address).value == 0x1122334455667788
        for outside in [(0xFFFF, 2), (0x10000, 1), (0x101000, 1), (-1, 1), (0, -1)]:
            with pytest.raises(GuestMemoryError):
                memory.host_address(*outside)
    finally:
        memory.close()


def test_a_refused_memfd_is_one_clear_error(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(os, "memfd_create", refuse)
    with pytest.raises(
        KvmletError, match=r"^cannot create shareable guest RAM: too many open files$"
    ):
        GuestMemory.memfd(LAYOUT)


def test_a_refused_memfd_mapping_leaves_no_file_open(monkeypatch):
    real_mmap = mmap.mmap
    calls = []

    def refuse_second(*args, **kwargs):
        calls.append(args)
        if len(calls) == 2:
            raise OSError(errno.ENOMEM, "Cannot allocate memory")
        return real_mmap(*args, **kwargs)

    before = open_fd_count()
    monkeypatch.setattr(mmap, "mmap", refuse_second)
    with pytest.raises(
        KvmletError, match=r"^cannot map \S+ GiB of shareable guest RAM: cannot allocate memory$"
    ):
        GuestMemory.memfd(LAYOUT)
    assert len(calls) == 2
    assert open_fd_count() == before


@pytest.mark.parametrize("base", [0, 0x10000])
@given(buffers=st.lists(st.tuples(st.integers(0, 0xF000), st.integers(0, 0x1000)), max_size=40))
def test_views_of_many_buffers_are_each_buffer(base, buffers):
    """`views` (one bounds check for the lot when there are many) gives each buffer's bytes,
    in order, whatever the bank's base."""
    memory = GuestMemory.anonymous([(base, 0x10000)])
    try:
        memory.write(base, bytes(range(256)) * 256)
        addresses = [base + offset for offset, _ in buffers]
        lengths = [length for _, length in buffers]
        views = memory.views(addresses, lengths)
        assert [bytes(view) for view in views] == [
            memory.read(base + offset, length) for offset, length in buffers
        ]
    finally:
        memory.close()
