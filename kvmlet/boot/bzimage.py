"""Loading a bzImage through the 64-bit Linux boot protocol (Documentation/x86/boot.rst).

A bzImage is real-mode setup code (`setup_sects` sectors after the boot sector) followed by the
protected-mode kernel, a self-decompressing stub. kvmlet skips the real-mode code entirely: it
loads the protected-mode kernel at 1 MiB, builds the zero page from the image's setup header and
enters at load address + 0x200 (`startup_64`) in long mode. The stub then moves itself to the end
of its `init_size` buffer at its preferred address and decompresses the kernel there.

The kernel is loaded at 1 MiB rather than at `pref_address`, as QEMU does: the stub relocates
itself in every case, so loading low costs nothing and keeps the image clear of its output.
We need protocol 2.12 or later (xloadflags, 64-bit entry declared by XLF_KERNEL_64).
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from kvmlet.boot import zero_page as zp
from kvmlet.boot.memory_map import BZIMAGE_LOAD_ADDRESS, MemoryMap, format_size
from kvmlet.errors import KvmletError
from kvmlet.memory import GuestMemory

MIN_PROTOCOL = 0x020C  # 2.12: xloadflags
STARTUP_64_OFFSET = 0x200
SECTOR_SIZE = 512
DEFAULT_SETUP_SECTS = 4  # a setup_sects of 0 means 4
DEFAULT_PREF_ADDRESS = 0x100_0000  # LOAD_PHYSICAL_ADDR of a default x86-64 kernel
JUMP_TARGET_BASE = zp.JUMP + 2  # the header ends at 0x202 + the byte at 0x201
_HEADER_END_MIN = zp.INIT_SIZE + 4  # the 2.12 header runs at least to the end of init_size


def _u8(data: bytes, offset: int) -> int:
    return data[offset]


def _u16(data: bytes, offset: int) -> int:
    return struct.unpack_from("<H", data, offset)[0]


def _u32(data: bytes, offset: int) -> int:
    return struct.unpack_from("<I", data, offset)[0]


def _u64(data: bytes, offset: int) -> int:
    return struct.unpack_from("<Q", data, offset)[0]


class SetupHeader(NamedTuple):
    """The fields of a bzImage setup header kvmlet uses, plus its raw bytes for the zero page."""

    version: int
    setup_sects: int
    syssize: int
    loadflags: int
    xloadflags: int
    initrd_addr_max: int
    kernel_alignment: int
    relocatable: bool
    cmdline_size: int
    pref_address: int
    init_size: int
    raw: bytes

    @property
    def version_text(self) -> str:
        return f"{self.version >> 8}.{self.version & 0xFF:02d}"

    @property
    def protected_mode_offset(self) -> int:
        """File offset of the protected-mode kernel (after the boot sector and setup code)."""
        return (self.setup_sects + 1) * SECTOR_SIZE

    def runtime_address(self, load_address: int) -> int:
        """Where the kernel decompresses itself when loaded at `load_address`.

        A relocatable kernel rounds its load address up to kernel_alignment but never goes
        below its compiled-in address (pref_address); a fixed one always uses pref_address.
        """
        if not self.relocatable:
            return self.pref_address
        aligned = -(-load_address // self.kernel_alignment) * self.kernel_alignment
        return max(aligned, self.pref_address)


def is_bzimage(data: bytes) -> bool:
    """Whether `data` starts like a Linux x86 boot image (boot flag and "HdrS" magic)."""
    return (
        len(data) >= zp.HEADER_MAGIC + 4
        and _u16(data, zp.BOOT_FLAG) == zp.BOOT_FLAG_VALUE
        and data[zp.HEADER_MAGIC : zp.HEADER_MAGIC + 4] == zp.HEADER_MAGIC_VALUE
    )


def parse_setup_header(data: bytes) -> SetupHeader:
    """Parse and validate the setup header at the start of a bzImage.

    Raises KvmletError for a file that is not a Linux boot image, a protocol older than 2.12,
    a 32-bit-only kernel, or a truncated or inconsistent image.
    """
    if not is_bzimage(data):
        raise KvmletError("not a Linux kernel image (no boot sector with a 'HdrS' setup header)")
    version = _u16(data, zp.VERSION) if len(data) >= zp.VERSION + 2 else 0
    if version < MIN_PROTOCOL:
        raise KvmletError(
            f"kernel boot protocol {version >> 8}.{version & 0xFF:02d} is too old "
            "(kvmlet needs 2.12 or later: Linux 3.8+)"
        )
    header_end = JUMP_TARGET_BASE + data[zp.JUMP + 1] if len(data) > zp.JUMP + 1 else 0
    if header_end < _HEADER_END_MIN or header_end > zp.SETUP_HEADER_LIMIT:
        raise KvmletError("corrupt kernel image: setup header has an impossible length")
    if len(data) < header_end:
        raise KvmletError("truncated kernel image: the setup header is cut short")
    xloadflags = _u16(data, zp.XLOADFLAGS)
    if not xloadflags & zp.XLF_KERNEL_64:
        raise KvmletError("kernel is 32-bit only (no 64-bit entry point); kvmlet boots x86-64")
    kernel_alignment = _u32(data, zp.KERNEL_ALIGNMENT)
    relocatable = bool(data[zp.RELOCATABLE_KERNEL])
    if relocatable and (kernel_alignment == 0 or kernel_alignment & (kernel_alignment - 1)):
        raise KvmletError("corrupt kernel image: kernel_alignment is not a power of two")
    header = SetupHeader(
        version=version,
        setup_sects=data[zp.SETUP_SECTS] or DEFAULT_SETUP_SECTS,
        syssize=_u32(data, zp.SYSSIZE),
        loadflags=_u8(data, zp.LOADFLAGS),
        xloadflags=xloadflags,
        initrd_addr_max=_u32(data, zp.INITRD_ADDR_MAX),
        kernel_alignment=kernel_alignment,
        relocatable=relocatable,
        cmdline_size=_u32(data, zp.CMDLINE_SIZE),
        pref_address=_u64(data, zp.PREF_ADDRESS) or DEFAULT_PREF_ADDRESS,
        init_size=_u32(data, zp.INIT_SIZE),
        raw=bytes(data[zp.SETUP_HEADER_START : header_end]),
    )
    payload = len(data) - header.protected_mode_offset
    # syssize counts 16-byte paragraphs, rounded up: allow the last one to be partial.
    if payload <= 0 or payload + 15 < header.syssize * 16:
        raise KvmletError("truncated kernel image: the protected-mode kernel is cut short")
    return header


class LoadedBzImage(NamedTuple):
    """A bzImage placed in guest memory, and what the rest of the boot needs from it."""

    header: SetupHeader
    entry: int
    kernel_end: int  # one past the highest address the kernel uses while it boots


def load_bzimage(memory: GuestMemory, data: bytes, memory_map: MemoryMap) -> LoadedBzImage:
    """Copy the protected-mode kernel of a bzImage to 1 MiB; return its entry and extent."""
    header = parse_setup_header(data)
    load_end = BZIMAGE_LOAD_ADDRESS + len(data) - header.protected_mode_offset
    runtime_end = header.runtime_address(BZIMAGE_LOAD_ADDRESS) + header.init_size
    kernel_end = max(load_end, runtime_end)
    if kernel_end > memory_map.low_ram_end:
        raise KvmletError(
            f"kernel needs {format_size(kernel_end)} of low RAM to boot, the guest has "
            f"{format_size(memory_map.low_ram_end)}; give it more memory (-m)"
        )
    # A temporary view (no named reference) so a mapped file can be closed even on error.
    memory.write(BZIMAGE_LOAD_ADDRESS, memoryview(data)[header.protected_mode_offset :])
    return LoadedBzImage(header, BZIMAGE_LOAD_ADDRESS + STARTUP_64_OFFSET, kernel_end)
