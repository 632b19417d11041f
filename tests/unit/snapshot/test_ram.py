"""Guest RAM in a snapshot: zero pages left as holes, mapped back copy-on-write, checksummed.

Banks are real host mappings (anonymous, memfd, or a snapshot file mapped MAP_PRIVATE), so
what the pagemap, SEEK_DATA and the page cache say is what a machine's RAM would give.
"""

from __future__ import annotations

import mmap
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmlet.errors import KvmletError
from kvmlet.memory import RamBank
from kvmlet.snapshot import ram

PAGE = ram.PAGE
BANK = 8 << 20


def data_pages(fd: int, offset: int, size: int) -> set[int]:
    """Pages of [offset, offset + size) that hold data in the file (not holes)."""
    return {
        page
        for start, end in ram.data_runs(fd, offset, offset + size)
        for page in range((start - offset) // PAGE, (end - offset) // PAGE)
    }


@pytest.fixture
def snapshot_fd(tmp_path):
    fd = os.open(tmp_path / "ram.snap", os.O_RDWR | os.O_CREAT, 0o600)
    os.ftruncate(fd, PAGE + BANK)
    yield fd
    os.close(fd)


def fill(bank: RamBank, pages: dict[int, bytes]) -> None:
    for page, data in pages.items():
        bank.mapping[page * PAGE : page * PAGE + len(data)] = data


PAGES = st.dictionaries(
    st.integers(0, BANK // PAGE - 1),
    st.binary(min_size=1, max_size=64).filter(any),
    max_size=12,
)


@settings(max_examples=30)
@given(pages=PAGES, zero_touched=st.lists(st.integers(0, BANK // PAGE - 1), max_size=4))
def test_only_non_zero_pages_are_written_and_the_mapping_reads_them_back(
    tmp_path_factory, pages, zero_touched
):
    path = tmp_path_factory.mktemp("ram") / "ram.snap"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    bank = RamBank.anonymous(0, BANK)
    try:
        os.ftruncate(fd, PAGE + BANK)
        for page in zero_touched:  # touched (allocated) but zero: still a hole
            bank.mapping[page * PAGE] = 0
        fill(bank, pages)
        checksums, written = ram.save_bank(fd, PAGE, bank)
        assert data_pages(fd, PAGE, BANK) == set(pages)
        assert written == len(pages) * PAGE
        restored = ram.map_bank(fd, PAGE, 0, BANK)
        assert restored.mapping[:] == bank.mapping[:]
        ram.verify_bank(fd, PAGE, BANK, checksums)
        restored.mapping.close()
    finally:
        bank.mapping.close()
        os.close(fd)


def test_a_restored_bank_writes_its_own_copy_and_never_the_file(snapshot_fd):
    bank = RamBank.anonymous(0, BANK)
    fill(bank, {3: b"saved"})
    ram.save_bank(snapshot_fd, PAGE, bank)
    restored = ram.map_bank(snapshot_fd, PAGE, 0, BANK)
    restored.mapping[3 * PAGE : 3 * PAGE + 7] = b"changed"
    assert os.pread(snapshot_fd, 5, PAGE + 3 * PAGE) == b"saved"
    assert restored.mapping[3 * PAGE : 3 * PAGE + 7] == b"changed"
    restored.mapping.close()
    bank.mapping.close()


def test_saving_a_restored_bank_keeps_pages_it_never_touched(tmp_path, snapshot_fd):
    """Pages of the old file not faulted in are not in the pagemap: its data extents count."""
    bank = RamBank.anonymous(0, BANK)
    fill(bank, {1: b"untouched since the restore", 700: b"changed later"})
    ram.save_bank(snapshot_fd, PAGE, bank)
    bank.mapping.close()
    restored = ram.map_bank(snapshot_fd, PAGE, 0, BANK)
    restored.mapping[700 * PAGE : 700 * PAGE + 3] = b"new"
    again = os.open(tmp_path / "again.snap", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.ftruncate(again, PAGE + BANK)
        ram.save_bank(again, PAGE, restored, backing=(snapshot_fd, PAGE))
        assert data_pages(again, PAGE, BANK) == {1, 700}
        copy = ram.map_bank(again, PAGE, 0, BANK)
        assert copy.mapping[PAGE : PAGE + 27] == b"untouched since the restore"
        assert copy.mapping[700 * PAGE : 700 * PAGE + 13] == b"newnged later"
        copy.mapping.close()
    finally:
        os.close(again)
        restored.mapping.close()


def test_without_a_pagemap_every_page_is_looked_at(snapshot_fd, monkeypatch):
    monkeypatch.setattr(ram, "resident_runs", lambda bank: None)
    bank = RamBank.anonymous(0, BANK)
    fill(bank, {5: b"x", 2047: b"y"})
    _, written = ram.save_bank(snapshot_fd, PAGE, bank)
    assert written == 2 * PAGE
    assert data_pages(snapshot_fd, PAGE, BANK) == {5, 2047}
    bank.mapping.close()


def test_the_pagemap_finds_the_pages_present(snapshot_fd):
    bank = RamBank.anonymous(0, BANK)
    bank.mapping.madvise(mmap.MADV_NOHUGEPAGE)
    fill(bank, {10: b"a", 11: b"b", 500: b"c"})
    assert ram.resident_runs(bank) == [(10 * PAGE, 12 * PAGE), (500 * PAGE, 501 * PAGE)]
    bank.mapping.close()


def test_a_memfd_bank_is_saved_from_its_data_and_loaded_back_into_a_memfd(snapshot_fd):
    bank = RamBank.memfd(0, BANK)
    fill(bank, {0: b"first", 1000: b"middle", BANK // PAGE - 1: b"last"})
    _, written = ram.save_bank(snapshot_fd, PAGE, bank)
    assert written == 3 * PAGE
    fresh = RamBank.memfd(0, BANK)
    assert ram.load_bank(snapshot_fd, PAGE, fresh) == 3 * PAGE
    assert os.fstat(fresh.fd).st_blocks * 512 <= 3 * PAGE  # the holes stay unallocated
    assert fresh.mapping[:] == bank.mapping[:]
    for each in (bank, fresh):
        each.mapping.close()
        os.close(each.fd)


def test_verify_finds_a_damaged_chunk_and_data_in_a_hole(snapshot_fd):
    bank = RamBank.anonymous(0, BANK)
    fill(bank, {100: b"data"})
    checksums, _ = ram.save_bank(snapshot_fd, PAGE, bank)
    bank.mapping.close()
    ram.verify_bank(snapshot_fd, PAGE, BANK, checksums)
    os.pwrite(snapshot_fd, b"D", PAGE + 100 * PAGE + 1)
    with pytest.raises(KvmletError, match=r"0x0-0x1fffff of a bank is damaged"):
        ram.verify_bank(snapshot_fd, PAGE, BANK, checksums)
    os.pwrite(snapshot_fd, b"a", PAGE + 100 * PAGE + 1)
    os.pwrite(snapshot_fd, b"!", PAGE + (6 << 20))
    with pytest.raises(KvmletError, match=r"0x600000-0x7fffff"):
        ram.verify_bank(snapshot_fd, PAGE, BANK, checksums)


def test_verify_refuses_checksums_of_another_layout(snapshot_fd):
    with pytest.raises(KvmletError, match="do not match its RAM layout"):
        ram.verify_bank(snapshot_fd, PAGE, BANK, bytes(4))
