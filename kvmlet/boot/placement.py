"""Putting the kernel command line and the initrd into guest memory, with the kernel's limits.

The command line goes at CMDLINE_AREA, NUL-terminated, no longer than the kernel accepts. The
initrd goes as high as possible in low RAM (as boot.rst recommends), page-aligned, wholly below
both the end of low RAM and the kernel's `initrd_addr_max`, and above everything the kernel
occupies while it unpacks itself.
"""

from __future__ import annotations

import os

from kvmlet.boot.memory_map import CMDLINE_AREA, INITRD_ALIGNMENT, MemoryMap, format_size
from kvmlet.boot.zero_page import Initrd
from kvmlet.errors import KvmletError
from kvmlet.memory import GuestMemory

# COMMAND_LINE_SIZE - 1 on x86 (for kernels without a setup header saying otherwise).
DEFAULT_CMDLINE_SIZE = 2047


def write_command_line(memory: GuestMemory, cmdline: str, max_length: int) -> int:
    """Write `cmdline` NUL-terminated at CMDLINE_AREA; return its address.

    `max_length` is the kernel's limit without the NUL (the setup header's cmdline_size).
    """
    encoded = cmdline.encode()
    if b"\0" in encoded:
        raise KvmletError("kernel command line contains a NUL byte")
    limit = min(max_length, CMDLINE_AREA.size - 1)
    if len(encoded) > limit:
        raise KvmletError(
            f"kernel command line is {len(encoded)} bytes; this kernel accepts at most {limit}"
        )
    memory.write(CMDLINE_AREA.base, encoded + b"\0")
    return CMDLINE_AREA.base


def load_initrd(
    memory: GuestMemory,
    path: str | os.PathLike[str],
    memory_map: MemoryMap,
    kernel_end: int,
    initrd_addr_max: int,
) -> Initrd:
    """Read the initrd at `path` into the top of low RAM, below `initrd_addr_max`.

    `kernel_end` is one past the highest address the kernel uses while booting; the initrd must
    stay above it. Raises KvmletError when the file cannot be read or does not fit.
    """
    try:
        with open(path, "rb") as file:
            size = os.fstat(file.fileno()).st_size
            address = initrd_address(size, memory_map, kernel_end, initrd_addr_max)
            view = memory.view(address, size)
            try:
                read = file.readinto(view)
            finally:
                view.release()
    except OSError as error:
        raise KvmletError(f"cannot read initrd {os.fspath(path)}: {error.strerror}") from None
    if read != size:
        raise KvmletError(f"initrd {os.fspath(path)} changed size while being read")
    return Initrd(address, size)


def initrd_address(size: int, memory_map: MemoryMap, kernel_end: int, initrd_addr_max: int) -> int:
    """The highest page-aligned address where an initrd of `size` bytes fits."""
    if size == 0:
        raise KvmletError("initrd is empty")
    top = min(memory_map.low_ram_end, initrd_addr_max + 1)
    address = (top - size) & ~(INITRD_ALIGNMENT - 1)
    if address < kernel_end:
        raise KvmletError(
            f"initrd of {format_size(size)} does not fit in RAM beside the kernel; "
            f"give the guest more memory (-m)"
        )
    return address
