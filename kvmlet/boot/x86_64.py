"""The CPU-side boot structures in guest memory: a flat GDT and identity-mapped page tables.

Both Linux entry points kvmlet uses need a GDT: the 64-bit boot protocol wants flat segments
at selectors 0x10 (code, `__BOOT_CS`) and 0x18 (data, `__BOOT_DS`); the PVH entry wants a flat
32-bit code segment. The GDT here is laid out as the kernel's own boot GDT is:

    0x00 null, 0x08 flat 32-bit code, 0x10 flat 64-bit code, 0x18 flat data

The 64-bit entry also needs paging on, with the kernel, the zero page and the command line
identity-mapped. `write_identity_page_tables` maps the first 4 GiB with 2 MiB pages (supported
by every x86-64 CPU, unlike 1 GiB pages): one PML4, one PDPT and four page directories.
"""

from __future__ import annotations

import struct
from typing import Literal, NamedTuple

from kvmlet.boot.memory_map import GDT_ADDRESS, PAGE_TABLES_AREA, GiB, MiB
from kvmlet.memory import GuestMemory

CODE32_SELECTOR = 0x08
CODE64_SELECTOR = 0x10
DATA_SELECTOR = 0x18

# Segment descriptors: base 0, limit 0xFFFFF in 4 KiB units (4 GiB), present, DPL 0.
_CODE32_DESCRIPTOR = 0x00CF_9B00_0000_FFFF  # execute/read, D=1 (32-bit), G=1
_CODE64_DESCRIPTOR = 0x00AF_9B00_0000_FFFF  # execute/read, L=1 (64-bit), G=1
_DATA_DESCRIPTOR = 0x00CF_9300_0000_FFFF  # read/write, B=1, G=1

GDT_ENTRIES = (0, _CODE32_DESCRIPTOR, _CODE64_DESCRIPTOR, _DATA_DESCRIPTOR)
GDT_LIMIT = len(GDT_ENTRIES) * 8 - 1

IDENTITY_MAPPED_SIZE = 4 * GiB
LARGE_PAGE_SIZE = 2 * MiB
PAGE_PRESENT = 1 << 0
PAGE_WRITABLE = 1 << 1
PAGE_LARGE = 1 << 7  # PS: a PD entry maps a 2 MiB page

PML4_ADDRESS = PAGE_TABLES_AREA.base
PDPT_ADDRESS = PML4_ADDRESS + 0x1000
PAGE_DIRECTORIES_ADDRESS = PDPT_ADDRESS + 0x1000
_PAGE_DIRECTORY_COUNT = IDENTITY_MAPPED_SIZE // GiB


class BootCpuState(NamedTuple):
    """Where and how the boot vCPU starts a kernel: filled in by a loader.

    `mode` "long64": 64-bit long mode with paging (`cr3` holds identity page tables), RIP =
    `entry`, RSI = `rsi` (the zero page). "protected32": flat 32-bit protected mode with
    paging off (the PVH and multiboot entries), RIP = `entry`, RBX = `rbx` (hvm_start_info or
    the multiboot information), RAX = `rax` (the multiboot boot loader magic).
    """

    mode: Literal["long64", "protected32"]
    entry: int
    rsi: int = 0
    rbx: int = 0
    cr3: int = 0
    gdt_base: int = 0
    gdt_limit: int = 0
    code_selector: int = 0x10
    data_selector: int = 0x18
    rax: int = 0


def write_gdt(memory: GuestMemory) -> None:
    """Write the boot GDT at GDT_ADDRESS."""
    memory.write(GDT_ADDRESS, struct.pack(f"<{len(GDT_ENTRIES)}Q", *GDT_ENTRIES))


def write_identity_page_tables(memory: GuestMemory) -> int:
    """Identity-map the first 4 GiB with 2 MiB pages; return the PML4 address (for CR3)."""
    memory.fill(PAGE_TABLES_AREA.base, PAGE_TABLES_AREA.size)
    table_flags = PAGE_PRESENT | PAGE_WRITABLE
    memory.write_u64(PML4_ADDRESS, PDPT_ADDRESS | table_flags)
    for gib in range(_PAGE_DIRECTORY_COUNT):
        directory = PAGE_DIRECTORIES_ADDRESS + gib * 0x1000
        memory.write_u64(PDPT_ADDRESS + gib * 8, directory | table_flags)
        first_page = gib * GiB
        entries = [
            (first_page + index * LARGE_PAGE_SIZE) | table_flags | PAGE_LARGE
            for index in range(512)
        ]
        memory.write(directory, struct.pack("<512Q", *entries))
    return PML4_ADDRESS


def long_mode_entry(memory: GuestMemory, entry: int, zero_page: int) -> BootCpuState:
    """Set up GDT and page tables for a 64-bit boot-protocol entry with RSI = zero page."""
    write_gdt(memory)
    cr3 = write_identity_page_tables(memory)
    return BootCpuState(
        mode="long64",
        entry=entry,
        rsi=zero_page,
        rbx=0,
        cr3=cr3,
        gdt_base=GDT_ADDRESS,
        gdt_limit=GDT_LIMIT,
        code_selector=CODE64_SELECTOR,
        data_selector=DATA_SELECTOR,
    )


def protected_mode_entry(memory: GuestMemory, entry: int, start_info: int) -> BootCpuState:
    """Set up the GDT for a PVH entry: 32-bit flat protected mode, paging off, EBX = start_info."""
    write_gdt(memory)
    return BootCpuState(
        mode="protected32",
        entry=entry,
        rsi=0,
        rbx=start_info,
        cr3=0,
        gdt_base=GDT_ADDRESS,
        gdt_limit=GDT_LIMIT,
        code_selector=CODE32_SELECTOR,
        data_selector=DATA_SELECTOR,
    )
