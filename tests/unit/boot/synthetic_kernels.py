"""Synthetic kernel images for the boot-loader tests: bzImages and ELF vmlinux files.

They carry just the headers the loaders read and recognisable payload bytes, so a test can
check where every byte ended up.
"""

from __future__ import annotations

import struct

MiB = 1 << 20
XLF_KERNEL_64 = 1


def make_bzimage(
    payload: bytes = b"\x90" * 4096,
    *,
    version: int = 0x020F,
    xloadflags: int = XLF_KERNEL_64,
    setup_sects: int = 4,
    init_size: int = 4 * MiB,
    pref_address: int = 16 * MiB,
    kernel_alignment: int = 2 * MiB,
    relocatable: bool = True,
    cmdline_size: int = 2047,
    initrd_addr_max: int = 0x7FFF_FFFF,
    loadflags: int = 0x01,
) -> bytes:
    """A bzImage: boot sector + setup sectors with a 2.15-style header, then `payload`."""
    setup = bytearray(((setup_sects or 4) + 1) * 512)  # 0 setup sectors means 4
    setup[0x1F1] = setup_sects
    struct.pack_into("<I", setup, 0x1F4, (len(payload) + 15) // 16)  # syssize
    struct.pack_into("<H", setup, 0x1FE, 0xAA55)  # boot_flag
    setup[0x200:0x202] = bytes([0xEB, 0x6A])  # jmp: header ends at 0x202 + 0x6A = 0x26C
    setup[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", setup, 0x206, version)
    setup[0x211] = loadflags
    struct.pack_into("<I", setup, 0x22C, initrd_addr_max)
    struct.pack_into("<I", setup, 0x230, kernel_alignment)
    setup[0x234] = int(relocatable)
    struct.pack_into("<H", setup, 0x236, xloadflags)
    struct.pack_into("<I", setup, 0x238, cmdline_size)
    struct.pack_into("<Q", setup, 0x258, pref_address)
    struct.pack_into("<I", setup, 0x260, init_size)
    setup[0x26C:0x270] = b"TAIL"  # past the header: must not reach the zero page
    return bytes(setup) + payload


def note(name: bytes, note_type: int, desc: bytes) -> bytes:
    """An ELF note: header, name and description, each padded to 4 bytes."""

    def pad(data: bytes) -> bytes:
        return data + bytes(-len(data) % 4)

    return struct.pack("<III", len(name), len(desc), note_type) + pad(name) + pad(desc)


def pvh_note(entry: int, size: int = 8) -> bytes:
    """A XEN_ELFNOTE_PHYS32_ENTRY note with a `size`-byte address (Linux x86-64 uses 8)."""
    return note(b"Xen\0", 18, entry.to_bytes(size, "little"))


def make_elf(
    segments: list[tuple[int, int, bytes, int]],
    *,
    entry: int,
    notes: bytes = b"",
    notes_in: str = "segment",
    elf_class: int = 2,
    machine: int = 62,
) -> bytes:
    """An ELF64 executable from (paddr, vaddr, file bytes, memsz) segments.

    `notes` goes in a PT_NOTE segment (`notes_in="segment"`) or only in a SHT_NOTE section
    (`notes_in="section"`), the two places the loader looks for the PVH note.
    """
    phdr_count = len(segments) + (1 if notes and notes_in == "segment" else 0)
    offset = 64 + 56 * phdr_count
    notes_offset = offset
    offset += len(notes)
    body = bytearray(notes)
    phdrs = []
    for paddr, vaddr, data, memsz in segments:
        phdrs.append(struct.pack("<IIQQQQQQ", 1, 5, offset, vaddr, paddr, len(data), memsz, 0))
        body += data
        offset += len(data)
    if notes and notes_in == "segment":
        phdrs.append(struct.pack("<IIQQQQQQ", 4, 4, notes_offset, 0, 0, len(notes), 0, 4))
    shdrs = b""
    if notes and notes_in == "section":
        null_section = bytes(64)
        note_section = struct.pack("<IIQQQQIIQQ", 0, 7, 0, 0, notes_offset, len(notes), 0, 0, 4, 0)
        shdrs = null_section + note_section
    shoff = offset if shdrs else 0
    ident = b"\x7fELF" + bytes([elf_class, 1, 1]) + bytes(9)
    header = struct.pack(
        "<16sHHIQQQIHHHHHH",
        ident,
        2,  # ET_EXEC
        machine,
        1,
        entry,
        64 if phdr_count else 0,
        shoff,
        0,
        64,
        56,
        phdr_count,
        64,
        len(shdrs) // 64,
        0,
    )
    return header + b"".join(phdrs) + bytes(body) + shdrs


MULTIBOOT_MAGIC = 0x1BADB002
MULTIBOOT_ADDRESSES = 1 << 16


def multiboot_header(flags: int, addresses: tuple[int, ...] = (), checksum: int | None = None):
    """A multiboot header: magic, flags, checksum (correct unless given), address fields."""
    if checksum is None:
        checksum = -(MULTIBOOT_MAGIC + flags) & 0xFFFF_FFFF
    return struct.pack("<III", MULTIBOOT_MAGIC, flags, checksum) + struct.pack(
        f"<{len(addresses)}I", *addresses
    )


def make_multiboot_kludge(
    text: bytes,
    *,
    load: int = 2 * MiB,
    bss: int = 0x1000,
    entry_offset: int = 0x30,
    flags: int = 0x3,
    prefix: bytes = b"",
) -> bytes:
    """An a.out-kludge image: `prefix` (not loaded), then a header at the start of the loaded
    text (at physical `load`), then `text`, and `bss` bytes of bss after it."""
    header_size = 12 + 20
    loaded = header_size + len(text)
    addresses = (load, load, load + loaded, load + loaded + bss, load + entry_offset)
    return prefix + multiboot_header(flags | MULTIBOOT_ADDRESSES, addresses) + text


def make_elf32(
    segments: list[tuple[int, int, bytes, int]], *, entry: int, machine: int = 3, lead: bytes = b""
) -> bytes:
    """An i386 ELF32 executable from (paddr, vaddr, file bytes, memsz) segments; `lead` goes
    right after the program headers (where a multiboot header usually sits)."""
    offset = 52 + 32 * len(segments)
    body = bytearray(lead)
    offset += len(lead)
    phdrs = []
    for paddr, vaddr, data, memsz in segments:
        phdrs.append(struct.pack("<IIIIIIII", 1, offset, vaddr, paddr, len(data), memsz, 5, 0))
        body += data
        offset += len(data)
    ident = b"\x7fELF" + bytes([1, 1, 1]) + bytes(9)
    header = struct.pack(
        "<16sHHIIIIIHHHHHH", ident, 2, machine, 1, entry, 52, 0, 0, 52, 32, len(segments), 40, 0, 0
    )
    return header + b"".join(phdrs) + bytes(body)
