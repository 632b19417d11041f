"""Memory map: RAM banks, the e820 map, fixed windows and RAM size parsing."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvmlet.boot import memory_map as mm
from kvmlet.boot.memory_map import E820Entry, E820Type, GiB, MemoryMap, MiB, parse_size
from kvmlet.errors import KvmletError


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("256M", 256 * MiB),
        ("1G", GiB),
        ("1g", GiB),
        ("512", 512 * MiB),
        ("2GiB", 2 * GiB),
        ("64MB", 64 * MiB),
        ("32768K", 32 * MiB),
        (" 128M ", 128 * MiB),
    ],
)
def test_parse_size_accepts_the_usual_spellings(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "cannot read RAM size"),
        ("lots", "cannot read RAM size"),
        ("1.5G", "cannot read RAM size"),
        ("-1G", "cannot read RAM size"),
        ("256b", "cannot read RAM size"),
        ("1" * 30, "cannot read RAM size"),
        ("0", "out of range"),
        ("8M", "out of range"),
        ("1T", "out of range"),
        ("16387K", "multiple of 4 KiB"),
    ],
)
def test_parse_size_rejects_nonsense_with_one_line(text, message):
    with pytest.raises(KvmletError, match=message) as error:
        parse_size(text)
    assert "\n" not in str(error.value)


def test_small_guest_has_one_bank_and_the_legacy_hole_reserved():
    layout = MemoryMap(256 * MiB)
    assert layout.ram_banks() == [(0, 256 * MiB)]
    assert layout.e820() == [
        E820Entry(0, 0x9FC00, E820Type.RAM),
        E820Entry(0x9FC00, 0x100000 - 0x9FC00, E820Type.RESERVED),
        E820Entry(0x100000, 256 * MiB - 0x100000, E820Type.RAM),
    ]


def test_large_guest_splits_around_the_pci_hole():
    layout = MemoryMap(4 * GiB)
    assert layout.ram_banks() == [(0, 3 * GiB), (4 * GiB, GiB)]
    assert layout.e820()[-2:] == [
        E820Entry(0x100000, 3 * GiB - 0x100000, E820Type.RAM),
        E820Entry(4 * GiB, GiB, E820Type.RAM),
    ]


@given(pages=st.integers(mm.MIN_RAM_SIZE // mm.PAGE_SIZE, mm.MAX_RAM_SIZE // mm.PAGE_SIZE))
def test_e820_accounts_for_all_ram_and_avoids_the_mmio_hole(pages):
    layout = MemoryMap(pages * mm.PAGE_SIZE)
    entries = layout.e820()
    assert sum(entry.size for entry in entries) == layout.ram_size
    for low, high in itertools.pairwise(entries):
        assert low.end <= high.address
    for entry in entries:
        assert entry.end <= mm.MMIO_HOLE.base or entry.address >= mm.MMIO_HOLE.end
    ram = [(entry.address, entry.size) for entry in entries if entry.type == E820Type.RAM]
    banks = layout.ram_banks()
    for address, size in ram:  # every usable range is backed by a RAM bank
        assert any(base <= address and address + size <= base + length for base, length in banks)


def test_windows_sit_in_the_hole_clear_of_each_other_and_the_apics():
    windows = [mm.PCI_MMIO_WINDOW, mm.VIRTIO_MMIO_WINDOW]
    for window in windows:
        assert mm.MMIO_HOLE.contains(window.base, window.size)
        assert not window.contains(mm.IOAPIC_ADDRESS)
        assert not window.contains(mm.LAPIC_ADDRESS)
    assert mm.PCI_MMIO_WINDOW.end <= mm.VIRTIO_MMIO_WINDOW.base
    assert mm.VIRTIO_MMIO_WINDOW.end <= mm.IOAPIC_ADDRESS
    assert mm.PCI_IO_WINDOW.base >= 0x1000 and mm.PCI_IO_WINDOW.end <= 0x10000


def test_boot_structures_do_not_overlap_and_stay_in_usable_low_memory():
    areas = [
        mm.AddressRange(mm.GDT_ADDRESS, 0x100),
        mm.PVH_START_INFO_AREA,
        mm.AddressRange(mm.ZERO_PAGE_ADDRESS, 0x1000),
        mm.SETUP_DATA_AREA,
        mm.PAGE_TABLES_AREA,
        mm.CMDLINE_AREA,
    ]
    for first, second in itertools.combinations(areas, 2):
        assert first.end <= second.base or second.end <= first.base
    for area in areas:
        assert area.end <= mm.EBDA_START
    assert mm.MP_TABLE_AREA.base >= mm.EBDA_START
    assert mm.MP_TABLE_AREA.end <= mm.HIGH_MEMORY_START
