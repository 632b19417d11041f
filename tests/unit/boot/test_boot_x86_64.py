"""Long-mode boot structures: GDT descriptors and identity page tables, walked like the MMU."""

from __future__ import annotations

import struct

from hypothesis import given
from hypothesis import strategies as st

from kvmlet.boot import x86_64
from kvmlet.boot.memory_map import GDT_ADDRESS, GiB, MemoryMap, MiB
from kvmlet.memory import GuestMemory


def decode(descriptor: int) -> dict:
    """The fields of a segment descriptor that matter for a flat segment."""
    return {
        "base": ((descriptor >> 16) & 0xFFFFFF) | ((descriptor >> 56) << 24),
        "limit": (descriptor & 0xFFFF) | (((descriptor >> 48) & 0xF) << 16),
        "type": (descriptor >> 40) & 0xF,
        "s": (descriptor >> 44) & 1,
        "present": (descriptor >> 47) & 1,
        "long": (descriptor >> 53) & 1,
        "db": (descriptor >> 54) & 1,
        "granularity": (descriptor >> 55) & 1,
    }


def test_gdt_has_flat_code_and_data_at_the_boot_protocol_selectors(memory):
    x86_64.write_gdt(memory)
    table = struct.unpack("<4Q", memory.read(GDT_ADDRESS, 32))
    assert table[0] == 0
    assert x86_64.GDT_LIMIT == 31
    flat = {"base": 0, "limit": 0xFFFFF, "granularity": 1, "present": 1, "s": 1}
    code32, code64, data = (decode(table[s // 8]) for s in (0x08, 0x10, 0x18))
    assert flat.items() <= code32.items() and code32["type"] == 0xB and code32["db"] == 1
    assert flat.items() <= code64.items() and code64["type"] == 0xB and code64["long"] == 1
    assert code64["db"] == 0
    assert flat.items() <= data.items() and data["type"] == 0x3


def translate(memory: GuestMemory, cr3: int, address: int) -> int | None:
    """Walk 4-level page tables like the MMU; None when a level is not present."""
    table = cr3
    for level, shift in enumerate((39, 30, 21)):
        entry = memory.read_u64(table + ((address >> shift) & 0x1FF) * 8)
        if not entry & 1:
            return None
        assert entry & 2, "every level must be writable"
        frame = entry & 0x000F_FFFF_FFFF_F000
        if level == 2:
            assert entry & 0x80, "page directory entries map 2 MiB pages"
            return (frame & ~(2 * MiB - 1)) | (address & (2 * MiB - 1))
        assert not entry & 0x80
        table = frame
    raise AssertionError("unreachable")


LAYOUT = MemoryMap(64 * MiB)
MEMORY = GuestMemory.anonymous(LAYOUT.ram_banks())
CR3 = x86_64.write_identity_page_tables(MEMORY)


@given(address=st.integers(0, 4 * GiB - 1))
def test_first_4gib_is_identity_mapped(address):
    assert translate(MEMORY, CR3, address) == address


@given(address=st.integers(4 * GiB, (1 << 48) - 1))
def test_nothing_above_4gib_is_mapped(address):
    assert translate(MEMORY, CR3, address) is None


def test_tables_stay_in_their_area():
    assert x86_64.PAGE_TABLES_AREA.end == x86_64.PAGE_DIRECTORIES_ADDRESS + 4 * 0x1000


def test_entry_states(memory):
    long64 = x86_64.long_mode_entry(memory, entry=0x100200, zero_page=0x7000)
    assert (long64.mode, long64.entry, long64.rsi, long64.rbx) == ("long64", 0x100200, 0x7000, 0)
    assert (long64.code_selector, long64.data_selector) == (0x10, 0x18)
    assert long64.cr3 == x86_64.PML4_ADDRESS and long64.gdt_base == GDT_ADDRESS
    pvh = x86_64.protected_mode_entry(memory, entry=0x1000040, start_info=0x6000)
    assert (pvh.mode, pvh.entry, pvh.rbx, pvh.cr3) == ("protected32", 0x1000040, 0x6000, 0)
    assert (pvh.code_selector, pvh.data_selector) == (0x08, 0x18)
