"""Loading an uncompressed ELF64 `vmlinux`, and the PVH boot structures.

An ELF kernel skips the bzImage's self-decompression (on a software-emulated KVM that is minutes
saved). Its PT_LOAD segments go to their physical addresses (p_paddr), bss zeroed. It can then
be entered two ways:

- the 64-bit entry (`e_entry`, translated to a physical address when it is virtual) in long
  mode with a zero page, exactly as a bzImage's decompressed kernel is entered;
- the PVH entry, the address in the "Xen" ELF note of type XEN_ELFNOTE_PHYS32_ENTRY, in 32-bit
  flat protected mode with paging off and EBX pointing at an `hvm_start_info`.

kvmlet's default for an ELF kernel is the 64-bit entry: its zero page carries the setup_data
list, and with it a SETUP_RNG_SEED. Linux 6.1's PVH path (arch/x86/platform/pvh/enlighten.c)
builds its boot_params from start_info alone: the memory map, the command line and the first
module as initrd, nothing else. A PVH-booted guest has no seed and, without a hardware RNG,
waits tens of seconds for entropy. PVH stays available on request.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from kvmlet.boot.memory_map import (
    HIGH_MEMORY_START,
    PVH_START_INFO_AREA,
    E820Entry,
    MemoryMap,
    format_size,
)
from kvmlet.boot.zero_page import Initrd
from kvmlet.errors import KvmletError
from kvmlet.memory import GuestMemory

ELF_MAGIC = b"\x7fELF"
ELFCLASS64 = 2
ELFDATA2LSB = 1
EM_X86_64 = 62
PT_LOAD = 1
PT_NOTE = 4
SHT_NOTE = 7

_ELF_HEADER = struct.Struct("<16sHHIQQQIHHHHHH")
_PROGRAM_HEADER = struct.Struct("<IIQQQQQQ")
_SECTION_HEADER = struct.Struct("<IIQQQQIIQQ")
_NOTE_HEADER = struct.Struct("<III")

XEN_NOTE_NAME = b"Xen\0"
XEN_ELFNOTE_PHYS32_ENTRY = 18

XEN_HVM_START_MAGIC = 0x336EC578
_START_INFO = struct.Struct("<IIIIQQQQII")  # hvm_start_info, version 1
_MODLIST_ENTRY = struct.Struct("<QQQQ")
_MEMMAP_ENTRY = struct.Struct("<QQII")
START_INFO_ADDRESS = PVH_START_INFO_AREA.base
MODLIST_ADDRESS = START_INFO_ADDRESS + 0x40
MEMMAP_ADDRESS = MODLIST_ADDRESS + 0x40


class Segment(NamedTuple):
    """One PT_LOAD segment: where its bytes are in the file and where they go."""

    file_offset: int
    file_size: int
    virtual_address: int
    physical_address: int
    memory_size: int

    @property
    def physical_end(self) -> int:
        return self.physical_address + self.memory_size


class ElfKernel(NamedTuple):
    """What kvmlet needs from a vmlinux: its segments and its two possible entry points."""

    segments: tuple[Segment, ...]
    entry: int | None  # physical address of the 64-bit entry, if e_entry maps into a segment
    pvh_entry: int | None  # physical address of the PVH entry, if the note is there

    @property
    def end(self) -> int:
        """One past the highest physical address the kernel's segments occupy."""
        return max(segment.physical_end for segment in self.segments)


def is_elf(data: bytes) -> bool:
    return len(data) >= 4 and data[:4] == ELF_MAGIC


def parse_elf(data: bytes) -> ElfKernel:
    """Parse an x86-64 ELF kernel; raise KvmletError if it is not one or is damaged."""
    if not is_elf(data):
        raise KvmletError("not an ELF file")
    if len(data) < _ELF_HEADER.size:
        raise KvmletError("truncated ELF file: the ELF header is cut short")
    (
        ident,
        _type,
        machine,
        _version,
        entry,
        phoff,
        shoff,
        _flags,
        _ehsize,
        phentsize,
        phnum,
        shentsize,
        shnum,
        _shstrndx,
    ) = _ELF_HEADER.unpack_from(data, 0)
    if ident[4] != ELFCLASS64 or ident[5] != ELFDATA2LSB or machine != EM_X86_64:
        raise KvmletError("not an x86-64 ELF kernel (wrong class, byte order or machine)")
    program_headers = _table(data, phoff, phentsize, phnum, _PROGRAM_HEADER, "program")
    segments = []
    notes = []
    for p_type, _flags, offset, vaddr, paddr, filesz, memsz, _align in program_headers:
        if p_type == PT_LOAD and memsz:
            if filesz > memsz or offset + filesz > len(data):
                raise KvmletError("truncated or corrupt ELF file: a segment lies past its end")
            segments.append(Segment(offset, filesz, vaddr, paddr, memsz))
        elif p_type == PT_NOTE:
            notes.append((offset, filesz))
    if not segments:
        raise KvmletError("ELF file has no loadable segment")
    pvh_entry = _find_pvh_entry(data, notes)
    if pvh_entry is None:
        section_headers = _table(data, shoff, shentsize, shnum, _SECTION_HEADER, "section")
        section_notes = [(sh[4], sh[5]) for sh in section_headers if sh[1] == SHT_NOTE]
        pvh_entry = _find_pvh_entry(data, section_notes)
    if pvh_entry is not None and not any(
        segment.physical_address <= pvh_entry < segment.physical_end for segment in segments
    ):
        raise KvmletError("corrupt ELF kernel: the PVH entry lies outside its segments")
    return ElfKernel(tuple(segments), _physical_entry(entry, segments), pvh_entry)


def _table(data: bytes, offset: int, entry_size: int, count: int, layout: struct.Struct, what):
    """Unpack `count` headers of `layout` at `offset`, bounds-checked against the file."""
    if count == 0:
        return []
    if entry_size != layout.size:
        raise KvmletError(f"corrupt ELF file: {what} headers have an unexpected size")
    if offset + count * entry_size > len(data):
        raise KvmletError(f"truncated ELF file: {what} headers lie past its end")
    return [layout.unpack_from(data, offset + index * entry_size) for index in range(count)]


def _find_pvh_entry(data: bytes, note_areas: list[tuple[int, int]]) -> int | None:
    """The XEN_ELFNOTE_PHYS32_ENTRY address in any of the note areas, or None."""
    for start, size in note_areas:
        end = min(start + size, len(data))
        offset = start
        while offset + _NOTE_HEADER.size <= end:
            name_size, desc_size, note_type = _NOTE_HEADER.unpack_from(data, offset)
            name_at = offset + _NOTE_HEADER.size
            desc_at = name_at + _align4(name_size)
            offset = desc_at + _align4(desc_size)
            if offset > end:
                break
            if (
                note_type == XEN_ELFNOTE_PHYS32_ENTRY
                and name_size == len(XEN_NOTE_NAME)
                and data[name_at : name_at + name_size] == XEN_NOTE_NAME
            ):
                if desc_size not in (4, 8):
                    raise KvmletError("corrupt ELF kernel: the PVH entry note has a bad size")
                return int.from_bytes(data[desc_at : desc_at + desc_size], "little")
    return None


def _align4(size: int) -> int:
    return (size + 3) & ~3


def _physical_entry(entry: int, segments: list[Segment]) -> int | None:
    """e_entry as a physical address: as is if it falls in a segment's physical range,
    translated if it falls in a segment's virtual range, None otherwise."""
    for segment in segments:
        if segment.physical_address <= entry < segment.physical_end:
            return entry
    for segment in segments:
        if segment.virtual_address <= entry < segment.virtual_address + segment.memory_size:
            return entry - segment.virtual_address + segment.physical_address
    return None


def load_elf(memory: GuestMemory, data: bytes, memory_map: MemoryMap) -> ElfKernel:
    """Parse an ELF kernel and copy its segments to their physical addresses, bss zeroed.

    Every segment must lie in low RAM above 1 MiB (below that are the boot structures).
    """
    kernel = parse_elf(data)
    for segment in kernel.segments:
        start, end = segment.physical_address, segment.physical_end
        if start < HIGH_MEMORY_START or end > memory_map.low_ram_end:
            raise KvmletError(
                f"kernel segment at {start:#x}-{end:#x} lies outside the guest's low RAM "
                f"(1 MiB to {format_size(memory_map.low_ram_end)}); give it more memory (-m)"
            )
    for segment in kernel.segments:
        file_end = segment.file_offset + segment.file_size
        memory.write(segment.physical_address, memoryview(data)[segment.file_offset : file_end])
        memory.fill(
            segment.physical_address + segment.file_size, segment.memory_size - segment.file_size
        )
    return kernel


def write_start_info(
    memory: GuestMemory, cmdline_address: int, initrd: Initrd | None, e820: list[E820Entry]
) -> int:
    """Write an hvm_start_info (version 1) with module list and memory map; return its address."""
    memmap_end = MEMMAP_ADDRESS + len(e820) * _MEMMAP_ENTRY.size
    if memmap_end > PVH_START_INFO_AREA.end:
        raise KvmletError(f"memory map of {len(e820)} entries does not fit the PVH start info")
    memory.fill(PVH_START_INFO_AREA.base, PVH_START_INFO_AREA.size)
    for index, entry in enumerate(e820):
        memory.write(
            MEMMAP_ADDRESS + index * _MEMMAP_ENTRY.size,
            _MEMMAP_ENTRY.pack(entry.address, entry.size, entry.type, 0),
        )
    module_count = 0
    if initrd is not None:
        memory.write(MODLIST_ADDRESS, _MODLIST_ENTRY.pack(initrd.address, initrd.size, 0, 0))
        module_count = 1
    start_info = _START_INFO.pack(
        XEN_HVM_START_MAGIC,
        1,  # version
        0,  # flags
        module_count,
        MODLIST_ADDRESS if module_count else 0,
        cmdline_address,
        0,  # rsdp_paddr: no ACPI
        MEMMAP_ADDRESS,
        len(e820),
        0,
    )
    memory.write(START_INFO_ADDRESS, start_info)
    return START_INFO_ADDRESS
