"""Booting a Linux kernel file: detect its format, load it and build every boot structure.

`load_kernel` is what the machine calls: it recognises a bzImage (boot sector with "HdrS") or
an ELF vmlinux by their magic, loads the kernel, the command line and the initrd, writes the
MP table, then either a zero page with an RNG seed (64-bit entry) or an hvm_start_info (PVH
entry), and the GDT and page tables the entry needs. `inspect_kernel` gives the CLI an early,
one-line error for a file kvmlet cannot boot, before any guest is created.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Literal, NamedTuple

from kvmlet.boot import elf, zero_page
from kvmlet.boot.memory_map import DEFAULT_INITRD_ADDR_MAX, MemoryMap
from kvmlet.boot.mptable import PciInterrupt, write_mp_table
from kvmlet.boot.placement import DEFAULT_CMDLINE_SIZE, load_initrd, write_command_line
from kvmlet.boot.x86_64 import BootCpuState, long_mode_entry, protected_mode_entry
from kvmlet.errors import KvmletError
from kvmlet.memory import GuestMemory

BootMethod = Literal["auto", "linux64", "pvh"]
BOOT_METHODS: tuple[BootMethod, ...] = ("auto", "linux64", "pvh")


class KernelInfo(NamedTuple):
    """What kind of kernel a file holds and which entry points it offers."""

    format: Literal["bzImage", "elf"]
    has_64bit_entry: bool
    has_pvh_entry: bool

    def boot_method(self, requested: BootMethod) -> Literal["linux64", "pvh"]:
        """The entry to use: `requested`, or for "auto" the 64-bit entry when there is one.

        The 64-bit entry wins because its zero page carries the RNG seed (see elf.py).
        """
        if requested not in BOOT_METHODS:
            raise KvmletError(f"unknown boot method {requested!r}: use auto, linux64 or pvh")
        if requested == "pvh" and not self.has_pvh_entry:
            if self.format == "bzImage":
                raise KvmletError("PVH boot needs an uncompressed ELF vmlinux, not a bzImage")
            raise KvmletError("kernel has no PVH entry note (build it with CONFIG_PVH=y)")
        if requested == "linux64" and not self.has_64bit_entry:
            raise KvmletError("kernel's ELF entry point lies outside its loadable segments")
        if requested != "auto":
            return requested
        if self.has_64bit_entry:
            return "linux64"
        if self.has_pvh_entry:
            return "pvh"
        raise KvmletError("kernel has neither a usable 64-bit entry point nor a PVH entry note")


@contextmanager
def _mapped_file(path: str | os.PathLike[str], what: str) -> Iterator[mmap.mmap]:
    """The file mapped read-only (no copy of a possibly large vmlinux), or a KvmletError."""
    name = os.fspath(path)
    try:
        with open(name, "rb") as file:
            if os.fstat(file.fileno()).st_size == 0:
                raise KvmletError(f"{what} {name} is empty")
            mapping = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as error:
        raise KvmletError(f"cannot read {what} {name}: {error.strerror}") from None
    with mapping:
        yield mapping


def _describe(data: bytes) -> KernelInfo:
    if elf.is_elf(data):
        kernel = elf.parse_elf(data)
        return KernelInfo("elf", kernel.entry is not None, kernel.pvh_entry is not None)
    from kvmlet.boot import bzimage  # only for a bzImage: an ELF boot never imports it

    if bzimage.is_bzimage(data):
        bzimage.parse_setup_header(data)
        return KernelInfo("bzImage", has_64bit_entry=True, has_pvh_entry=False)
    raise KvmletError("not a Linux kernel: neither a bzImage nor an ELF vmlinux")


def inspect_kernel(path: str | os.PathLike[str]) -> KernelInfo:
    """Check that `path` is a kernel kvmlet can boot; raise a one-line KvmletError if not."""
    with _mapped_file(path, "kernel") as data:
        try:
            return _describe(data)
        except KvmletError as error:
            raise KvmletError(f"{os.fspath(path)}: {error}") from None


def load_kernel(
    memory: GuestMemory,
    kernel_path: str | os.PathLike[str],
    initrd_path: str | os.PathLike[str] | None,
    cmdline: str,
    memory_map: MemoryMap,
    cpus: int,
    boot_method: BootMethod = "auto",
    pci_interrupts: Sequence[PciInterrupt] = (),
) -> BootCpuState:
    """Load a kernel (bzImage or ELF), initrd and command line; build the boot structures.

    Returns the state the boot vCPU must start in. Raises KvmletError for anything the user
    can fix: an unreadable or unbootable kernel, a command line too long, too little RAM.
    """
    with _mapped_file(kernel_path, "kernel") as data:
        try:
            info = _describe(data)
            method = info.boot_method(boot_method)
            if info.format == "bzImage":
                from kvmlet.boot.bzimage import load_bzimage

                loaded = load_bzimage(memory, data, memory_map)
                entry, kernel_end = loaded.entry, loaded.kernel_end
                cmdline_size = loaded.header.cmdline_size
                initrd_addr_max = loaded.header.initrd_addr_max
                setup_header = loaded.header.raw
            else:
                kernel = elf.load_elf(memory, data, memory_map)
                entry = kernel.entry if method == "linux64" else kernel.pvh_entry
                kernel_end = kernel.end
                cmdline_size = DEFAULT_CMDLINE_SIZE
                initrd_addr_max = DEFAULT_INITRD_ADDR_MAX
                setup_header = zero_page.minimal_setup_header()
        except KvmletError as error:
            raise KvmletError(f"{os.fspath(kernel_path)}: {error}") from None
    cmdline_address = write_command_line(memory, cmdline, cmdline_size)
    initrd = None
    if initrd_path is not None:
        initrd = load_initrd(memory, initrd_path, memory_map, kernel_end, initrd_addr_max)
    e820 = memory_map.e820()
    write_mp_table(memory, cpus, pci_interrupts)
    if method == "pvh":
        start_info = elf.write_start_info(memory, cmdline_address, initrd, e820)
        return protected_mode_entry(memory, entry, start_info)
    setup_data = zero_page.write_rng_seed(memory)
    boot_params = zero_page.write_zero_page(
        memory, setup_header, cmdline_address, initrd, e820, setup_data
    )
    return long_mode_entry(memory, entry, boot_params)
