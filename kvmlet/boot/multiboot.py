"""Multiboot (version 0.6.96) kernels: the header, the image, modules and the information
structure, entered in 32-bit protected mode as the specification's "Machine state" says.

The OS image carries a header in its first 8192 bytes, 4-byte aligned: magic 0x1BADB002, flags
and a checksum making the three sum to zero. Flags 0-15 are requirements (a loader that cannot
meet one must refuse the image): 0 page-aligns the modules, 1 asks for the memory fields, 2 for
video mode information, which kvmlet (no display) cannot give. Flag 16 says the header's address
fields (header, load, load end, bss end and entry addresses) describe the image ("the a.out
kludge"); without it the image must be ELF, loaded by its program headers at their physical
addresses (ELF32 for i386, or ELF64).

The information structure, its memory map and module list sit in MULTIBOOT_INFO_AREA; the
command line (the kernel's file name, then `-p`, as GRUB and QEMU pass it) and each module's
string (its file name, then its own arguments) in CMDLINE_AREA. Modules go after the kernel's
last byte (bss included), each page aligned, in low RAM. At entry EAX holds 0x2BADB002 and EBX
the structure's address; CS is a flat 32-bit code segment, the data segments flat, paging off.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import NamedTuple

from kvmlet.boot import elf
from kvmlet.boot.memory_map import (
    CMDLINE_AREA,
    EBDA_START,
    HIGH_MEMORY_START,
    MULTIBOOT_INFO_AREA,
    PAGE_SIZE,
    KiB,
    MemoryMap,
    format_size,
)
from kvmlet.boot.x86_64 import BootCpuState, protected_mode_entry
from kvmlet.errors import KvmletError
from kvmlet.memory import GuestMemory

HEADER_MAGIC = 0x1BADB002
BOOTLOADER_MAGIC = 0x2BADB002
SEARCH_LIMIT = 8192
"""The header lies wholly within the image's first 8 KiB."""

FLAG_PAGE_ALIGN = 1 << 0
FLAG_MEMORY_INFO = 1 << 1
FLAG_VIDEO_MODE = 1 << 2
FLAG_ADDRESSES = 1 << 16
REQUIREMENT_BITS = 0xFFFF
UNDERSTOOD_REQUIREMENTS = FLAG_PAGE_ALIGN | FLAG_MEMORY_INFO

# Which fields of the information structure are valid (its `flags` word).
INFO_MEMORY = 1 << 0
INFO_CMDLINE = 1 << 2
INFO_MODULES = 1 << 3
INFO_MEMORY_MAP = 1 << 6
INFO_BOOT_LOADER_NAME = 1 << 9

_HEADER = struct.Struct("<III")
_MAGIC_BYTES = HEADER_MAGIC.to_bytes(4, "little")
_ADDRESSES = struct.Struct("<IIIII")
_INFO_SIZE = 88  # the fields through the VBE ones (flags 11 and 12: never set, left zero)
_INFO = struct.Struct("<IIIIIII16xIIIIIII")
_MMAP_ENTRY = struct.Struct("<IQQI")
_MODULE = struct.Struct("<IIII")
MEMORY_MAP_ADDRESS = MULTIBOOT_INFO_AREA.base + _INFO_SIZE
BOOT_LOADER_NAME = b"kvmlet\0"

_ELF32_HEADER = struct.Struct("<16sHHIIIIIHHHHHH")
_ELF32_PROGRAM_HEADER = struct.Struct("<IIIIIIII")
ELFCLASS32 = 1
EM_386 = 3


class HeaderAddresses(NamedTuple):
    """The address fields of a header with flag 16 (all physical addresses)."""

    header: int
    load: int
    load_end: int
    bss_end: int
    entry: int


class MultibootHeader(NamedTuple):
    """A valid header found at `offset` in the image."""

    offset: int
    flags: int
    addresses: HeaderAddresses | None

    @property
    def page_align_modules(self) -> bool:
        return bool(self.flags & FLAG_PAGE_ALIGN)


class LoadSegment(NamedTuple):
    """Bytes [file_offset, file_offset + file_size) of the image go to `address`, followed by
    zeroes up to `memory_size`."""

    file_offset: int
    file_size: int
    address: int
    memory_size: int

    @property
    def end(self) -> int:
        return self.address + self.memory_size


class MultibootImage(NamedTuple):
    """What loading a multiboot kernel needs: its segments and its entry point."""

    header: MultibootHeader
    segments: tuple[LoadSegment, ...]
    entry: int

    @property
    def end(self) -> int:
        """One past the highest address the kernel occupies (bss included)."""
        return max(segment.end for segment in self.segments)


class Module(NamedTuple):
    """A boot module: the file's bytes and the string the kernel gets with it."""

    data: bytes
    string: str


def _magic_offsets(data: bytes):
    """Offsets of the magic word at 4-byte aligned places in the first 8 KiB (a C search:
    every boot looks, Linux kernels included)."""
    end = min(len(data), SEARCH_LIMIT)
    offset = data.find(_MAGIC_BYTES, 0, end)
    while offset != -1:
        if offset % 4 == 0:
            yield offset
        offset = data.find(_MAGIC_BYTES, offset + 1, end)


def find_header(data: bytes) -> MultibootHeader | None:
    """The first valid header in the image's first 8 KiB, or None.

    A magic word whose checksum does not match is not a header (the search goes on). Raises
    KvmletError when a valid header asks for what kvmlet cannot give or is inconsistent."""
    limit = min(len(data), SEARCH_LIMIT) - _HEADER.size
    for offset in _magic_offsets(data):
        if offset > limit:
            break
        magic, flags, checksum = _HEADER.unpack_from(data, offset)
        if (magic + flags + checksum) & 0xFFFF_FFFF == 0:
            return _parse_header(data, offset, flags)
    return None


def has_bad_checksum_header(data: bytes) -> bool:
    """Whether the first 8 KiB hold the magic word at an aligned offset (for a clearer error
    when `find_header` found nothing valid)."""
    return next(_magic_offsets(data), None) is not None


def _parse_header(data: bytes, offset: int, flags: int) -> MultibootHeader:
    unknown = flags & REQUIREMENT_BITS & ~UNDERSTOOD_REQUIREMENTS
    if flags & FLAG_VIDEO_MODE:
        raise KvmletError(
            "multiboot kernel requires video mode information (flag 2); kvmlet has no display"
        )
    if unknown:
        raise KvmletError(f"multiboot kernel requires features kvmlet does not know: {unknown:#x}")
    addresses = None
    if flags & FLAG_ADDRESSES:
        if offset + _HEADER.size + _ADDRESSES.size > min(len(data), SEARCH_LIMIT):
            raise KvmletError("multiboot header is cut short: its address fields are missing")
        addresses = HeaderAddresses(*_ADDRESSES.unpack_from(data, offset + _HEADER.size))
    return MultibootHeader(offset, flags, addresses)


def parse_image(data: bytes) -> MultibootImage:
    """The segments and entry of a multiboot kernel; KvmletError if it is not one or damaged."""
    header = find_header(data)
    if header is None:
        raise KvmletError("no multiboot header in the first 8 KiB")
    if header.addresses is not None:
        segments, entry = _kludge_segments(data, header)
    elif elf.is_elf(data):
        segments, entry = _elf_segments(data)
    else:
        raise KvmletError("multiboot kernel is not ELF and its header has no address fields")
    if not any(segment.address <= entry < segment.end for segment in segments):
        raise KvmletError(f"multiboot entry point {entry:#x} lies outside the loaded image")
    return MultibootImage(header, segments, entry)


def _kludge_segments(data: bytes, header: MultibootHeader) -> tuple[tuple[LoadSegment, ...], int]:
    """The one segment the address fields describe (text and data, then bss)."""
    fields = header.addresses
    assert fields is not None
    if fields.load > fields.header:
        raise KvmletError("multiboot header: load_addr lies above header_addr")
    file_offset = header.offset - (fields.header - fields.load)
    if file_offset < 0:
        raise KvmletError("multiboot header: header_addr - load_addr reaches before the file")
    if fields.load_end == 0:
        file_size = len(data) - file_offset
    elif fields.load_end < fields.load:
        raise KvmletError("multiboot header: load_end_addr lies below load_addr")
    else:
        file_size = fields.load_end - fields.load
    if file_offset + file_size > len(data):
        raise KvmletError("multiboot image is shorter than its header's load_end_addr says")
    memory_size = file_size
    if fields.bss_end:
        if fields.bss_end < fields.load + file_size:
            raise KvmletError("multiboot header: bss_end_addr lies below the loaded data")
        memory_size = fields.bss_end - fields.load
    if memory_size == 0:
        raise KvmletError("multiboot header describes an empty image")
    return (LoadSegment(file_offset, file_size, fields.load, memory_size),), fields.entry


def _elf_segments(data: bytes) -> tuple[tuple[LoadSegment, ...], int]:
    """PT_LOAD segments at their physical addresses, from an ELF32 (i386) or ELF64 image."""
    if len(data) > 4 and data[4] == ELFCLASS32:
        return _elf32_segments(data)
    kernel = elf.parse_elf(data)
    segments = tuple(
        LoadSegment(s.file_offset, s.file_size, s.physical_address, s.memory_size)
        for s in kernel.segments
    )
    if kernel.entry is None:
        raise KvmletError("multiboot ELF kernel's entry point lies outside its segments")
    return segments, kernel.entry


def _elf32_segments(data: bytes) -> tuple[tuple[LoadSegment, ...], int]:
    if len(data) < _ELF32_HEADER.size:
        raise KvmletError("truncated ELF file: the ELF header is cut short")
    fields = _ELF32_HEADER.unpack_from(data, 0)
    ident, machine, entry, phoff, phentsize, phnum = (
        fields[0],
        fields[2],
        fields[4],
        fields[5],
        fields[9],
        fields[10],
    )
    if ident[5] != elf.ELFDATA2LSB or machine != EM_386:
        raise KvmletError("not an i386 ELF32 kernel (wrong byte order or machine)")
    if phnum and phentsize != _ELF32_PROGRAM_HEADER.size:
        raise KvmletError("corrupt ELF file: program headers have an unexpected size")
    if phoff + phnum * phentsize > len(data):
        raise KvmletError("truncated ELF file: program headers lie past its end")
    segments = []
    virtual = []
    for index in range(phnum):
        p_type, offset, vaddr, paddr, filesz, memsz, _flags, _align = (
            _ELF32_PROGRAM_HEADER.unpack_from(data, phoff + index * phentsize)
        )
        if p_type != elf.PT_LOAD or not memsz:
            continue
        if filesz > memsz or offset + filesz > len(data):
            raise KvmletError("truncated or corrupt ELF file: a segment lies past its end")
        segments.append(LoadSegment(offset, filesz, paddr, memsz))
        virtual.append(vaddr)
    if not segments:
        raise KvmletError("ELF file has no loadable segment")
    if not any(segment.address <= entry < segment.end for segment in segments):
        for segment, vaddr in zip(segments, virtual, strict=True):
            if vaddr <= entry < vaddr + segment.memory_size:
                entry = entry - vaddr + segment.address
                break
    return tuple(segments), entry


def load_multiboot(
    memory: GuestMemory,
    data: bytes,
    memory_map: MemoryMap,
    cmdline: str,
    modules: Sequence[Module] = (),
) -> BootCpuState:
    """Load the kernel and its modules, write the information structure; return the entry
    state (32-bit protected mode, EAX = the boot loader magic, EBX = the structure)."""
    image = parse_image(data)
    for segment in image.segments:
        if segment.address < HIGH_MEMORY_START or segment.end > memory_map.low_ram_end:
            raise KvmletError(
                f"multiboot kernel segment at {segment.address:#x}-{segment.end:#x} lies "
                f"outside the guest's low RAM (1 MiB to {format_size(memory_map.low_ram_end)})"
            )
    for segment in image.segments:
        file_end = segment.file_offset + segment.file_size
        memory.write(segment.address, memoryview(data)[segment.file_offset : file_end])
        memory.fill(segment.address + segment.file_size, segment.memory_size - segment.file_size)
    placed = place_modules(image.end, [len(module.data) for module in modules], memory_map)
    for address, module in zip(placed, modules, strict=True):
        memory.write(address, module.data)
    info = write_info(memory, memory_map, cmdline, modules, placed)
    state = protected_mode_entry(memory, image.entry, info)
    return state._replace(rax=BOOTLOADER_MAGIC)


def place_modules(kernel_end: int, sizes: Sequence[int], memory_map: MemoryMap) -> list[int]:
    """Addresses for modules of `sizes` bytes: one after another from the kernel's end, each
    page aligned (whether or not the kernel asked: it costs at most a page each)."""
    addresses = []
    cursor = kernel_end
    for index, size in enumerate(sizes):
        address = -(-cursor // PAGE_SIZE) * PAGE_SIZE
        if address + size > memory_map.low_ram_end:
            raise KvmletError(
                f"multiboot module {index + 1} ({format_size(size)}) does not fit in low RAM "
                f"after the kernel; give the guest more memory (-m)"
            )
        addresses.append(address)
        cursor = address + size
    return addresses


def write_info(
    memory: GuestMemory,
    memory_map: MemoryMap,
    cmdline: str,
    modules: Sequence[Module],
    addresses: Sequence[int],
) -> int:
    """Write the information structure, memory map, module list and strings; return the
    structure's address."""
    strings = _StringArea(memory)
    cmdline_address = strings.add(cmdline, "the multiboot command line")
    loader_name = strings.add(BOOT_LOADER_NAME[:-1].decode(), "the boot loader name")
    e820 = memory_map.e820()
    modules_address = MEMORY_MAP_ADDRESS + len(e820) * _MMAP_ENTRY.size
    if modules_address + len(modules) * _MODULE.size > MULTIBOOT_INFO_AREA.end:
        raise KvmletError(f"{len(modules)} multiboot modules are more than kvmlet can list")
    memory.fill(MULTIBOOT_INFO_AREA.base, MULTIBOOT_INFO_AREA.size)
    for index, entry in enumerate(e820):
        memory.write(
            MEMORY_MAP_ADDRESS + index * _MMAP_ENTRY.size,
            _MMAP_ENTRY.pack(_MMAP_ENTRY.size - 4, entry.address, entry.size, int(entry.type)),
        )
    for index, (module, address) in enumerate(zip(modules, addresses, strict=True)):
        string = strings.add(module.string, f"module {index + 1}'s string")
        memory.write(
            modules_address + index * _MODULE.size,
            _MODULE.pack(address, address + len(module.data), string, 0),
        )
    flags = INFO_MEMORY | INFO_CMDLINE | INFO_MEMORY_MAP | INFO_BOOT_LOADER_NAME
    if modules:
        flags |= INFO_MODULES
    info = _INFO.pack(
        flags,
        EBDA_START // KiB,  # mem_lower: conventional memory below the EBDA
        (memory_map.low_ram_end - HIGH_MEMORY_START) // KiB,  # mem_upper: up to the hole
        0,  # boot_device: not given (flag 1 clear)
        cmdline_address,
        len(modules),
        modules_address if modules else 0,
        len(e820) * _MMAP_ENTRY.size,
        MEMORY_MAP_ADDRESS,
        0,  # drives_length
        0,  # drives_addr
        0,  # config_table
        loader_name,
        0,  # apm_table
    )
    memory.write(MULTIBOOT_INFO_AREA.base, info)
    return MULTIBOOT_INFO_AREA.base


class _StringArea:
    """NUL-terminated strings packed one after another into CMDLINE_AREA."""

    def __init__(self, memory: GuestMemory):
        self.memory = memory
        self.cursor = CMDLINE_AREA.base

    def add(self, text: str, what: str) -> int:
        encoded = text.encode()
        if b"\0" in encoded:
            raise KvmletError(f"{what} contains a NUL byte")
        if self.cursor + len(encoded) + 1 > CMDLINE_AREA.end:
            raise KvmletError(
                f"multiboot strings exceed {format_size(CMDLINE_AREA.size)} at {what}"
            )
        address = self.cursor
        self.memory.write(address, encoded + b"\0")
        self.cursor += len(encoded) + 1
        return address
