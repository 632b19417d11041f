"""The zero page (`struct boot_params`) and setup_data list of the 64-bit Linux boot protocol.

Both the bzImage loader and the ELF loader's 64-bit entry hand the kernel a zero page: a clean
4 KiB page with the setup header copied in (from the image, or a minimal one for a vmlinux),
our loader fields filled in, the e820 map, and a `setup_data` list carrying a SETUP_RNG_SEED.
The seed matters: without it a guest with no hardware RNG can wait tens of seconds for entropy.
Linux 6.1 credits the seed only when built with CONFIG_RANDOM_TRUST_BOOTLOADER=y; the
`random.trust_bootloader=on` parameter comes too late for it, because setup_arch() parses
setup_data before early parameters. Without that option the seed is mixed in but not counted.

Offsets come from arch/x86/include/uapi/asm/bootparam.h and Documentation/x86/zero-page.rst.
"""

from __future__ import annotations

import os
import struct
from typing import NamedTuple

from kvmlet.boot.memory_map import SETUP_DATA_AREA, ZERO_PAGE_ADDRESS, E820Entry
from kvmlet.errors import KvmletError
from kvmlet.memory import GuestMemory

ZERO_PAGE_SIZE = 0x1000

# boot_params fields we write (offsets into the zero page).
EXT_RAMDISK_IMAGE = 0x0C0
EXT_RAMDISK_SIZE = 0x0C4
EXT_CMD_LINE_PTR = 0x0C8
E820_ENTRIES = 0x1E8
SETUP_HEADER_START = 0x1F1
SETUP_HEADER_LIMIT = 0x290  # the header (and the padding after it) ends here
E820_TABLE = 0x2D0
E820_MAX_ENTRIES = 128
E820_ENTRY = struct.Struct("<QQI")

# setup_header fields, at the same offsets in the image and in the zero page.
SETUP_SECTS = 0x1F1
SYSSIZE = 0x1F4
BOOT_FLAG = 0x1FE
JUMP = 0x200
HEADER_MAGIC = 0x202
VERSION = 0x206
TYPE_OF_LOADER = 0x210
LOADFLAGS = 0x211
RAMDISK_IMAGE = 0x218
RAMDISK_SIZE = 0x21C
HEAP_END_PTR = 0x224
CMD_LINE_PTR = 0x228
INITRD_ADDR_MAX = 0x22C
KERNEL_ALIGNMENT = 0x230
RELOCATABLE_KERNEL = 0x234
XLOADFLAGS = 0x236
CMDLINE_SIZE = 0x238
SETUP_DATA = 0x250
PREF_ADDRESS = 0x258
INIT_SIZE = 0x260

BOOT_FLAG_VALUE = 0xAA55
HEADER_MAGIC_VALUE = b"HdrS"
LOADER_UNDEFINED = 0xFF  # type_of_loader for a boot loader without an assigned ID
LOADED_HIGH = 1 << 0
CAN_USE_HEAP = 1 << 7
XLF_KERNEL_64 = 1 << 0
# The end of the real-mode setup heap/stack, relative to the setup code, minus 0x200 (as
# boot.rst asks); used only by the real-mode setup code, which the 64-bit entry skips.
HEAP_END = 0xFE00

SETUP_DATA_HEADER = struct.Struct("<QII")  # next, type, len
SETUP_RNG_SEED = 9
RNG_SEED_SIZE = 32


class Initrd(NamedTuple):
    """Where an initial ramdisk was loaded in guest memory."""

    address: int
    size: int


def minimal_setup_header(version: int = 0x020C) -> bytes:
    """A setup header (zero-page bytes 0x1F1-0x26C) for a kernel that has none (a vmlinux).

    It holds what the kernel checks at its 64-bit entry: boot flag, "HdrS", the protocol
    version (2.12, the first with xloadflags), and the 64-bit flag.
    """
    page = bytearray(ZERO_PAGE_SIZE)
    struct.pack_into("<H", page, BOOT_FLAG, BOOT_FLAG_VALUE)
    page[HEADER_MAGIC : HEADER_MAGIC + 4] = HEADER_MAGIC_VALUE
    struct.pack_into("<H", page, VERSION, version)
    struct.pack_into("<H", page, XLOADFLAGS, XLF_KERNEL_64)
    return bytes(page[SETUP_HEADER_START : INIT_SIZE + 12])


def write_rng_seed(memory: GuestMemory, address: int = SETUP_DATA_AREA.base) -> int:
    """Write a one-entry setup_data list holding a fresh 32-byte SETUP_RNG_SEED; return it."""
    seed = os.urandom(RNG_SEED_SIZE)
    memory.write(address, SETUP_DATA_HEADER.pack(0, SETUP_RNG_SEED, len(seed)) + seed)
    return address


def write_zero_page(
    memory: GuestMemory,
    setup_header: bytes,
    cmdline_address: int,
    initrd: Initrd | None,
    e820: list[E820Entry],
    setup_data_address: int,
    address: int = ZERO_PAGE_ADDRESS,
) -> int:
    """Build the zero page at `address` from a setup header and our loader fields.

    `setup_header` is the image's bytes from 0x1F1 to the header's end. Returns the address.
    """
    if SETUP_HEADER_START + len(setup_header) > SETUP_HEADER_LIMIT:
        raise KvmletError("kernel setup header is larger than the zero page allows")
    if len(e820) > E820_MAX_ENTRIES:
        raise KvmletError(f"e820 map has {len(e820)} entries, the zero page holds 128")
    page = bytearray(ZERO_PAGE_SIZE)
    page[SETUP_HEADER_START : SETUP_HEADER_START + len(setup_header)] = setup_header
    page[TYPE_OF_LOADER] = LOADER_UNDEFINED
    page[LOADFLAGS] = (page[LOADFLAGS] & LOADED_HIGH) | CAN_USE_HEAP
    struct.pack_into("<H", page, HEAP_END_PTR, HEAP_END)
    struct.pack_into("<I", page, CMD_LINE_PTR, cmdline_address & 0xFFFF_FFFF)
    struct.pack_into("<I", page, EXT_CMD_LINE_PTR, cmdline_address >> 32)
    if initrd is not None:
        struct.pack_into("<I", page, RAMDISK_IMAGE, initrd.address & 0xFFFF_FFFF)
        struct.pack_into("<I", page, RAMDISK_SIZE, initrd.size & 0xFFFF_FFFF)
        struct.pack_into("<I", page, EXT_RAMDISK_IMAGE, initrd.address >> 32)
        struct.pack_into("<I", page, EXT_RAMDISK_SIZE, initrd.size >> 32)
    struct.pack_into("<Q", page, SETUP_DATA, setup_data_address)
    page[E820_ENTRIES] = len(e820)
    for index, entry in enumerate(e820):
        E820_ENTRY.pack_into(
            page, E820_TABLE + index * E820_ENTRY.size, entry.address, entry.size, entry.type
        )
    memory.write(address, page)
    return address
