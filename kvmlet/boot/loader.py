"""Booting a kernel file: detect its format, load it and build every boot structure.

`load_kernel` is what the machine calls: it recognises an ELF vmlinux or a bzImage (boot sector
with "HdrS") by their magic, and a multiboot kernel by the header in its first 8 KiB. A Linux
kernel gets its command line and initrd, the MP table, then either a zero page with an RNG seed
(64-bit entry) or an hvm_start_info (PVH entry), and the GDT and page tables the entry needs; a
multiboot kernel gets its modules, the MP table and the multiboot information structure
(`multiboot.py`). `inspect_kernel` gives the CLI an early, one-line error for a file kvmlet
cannot boot, before any guest is created.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Literal, NamedTuple

from kvmlet.boot import elf, multiboot, zero_page
from kvmlet.boot.memory_map import DEFAULT_INITRD_ADDR_MAX, MemoryMap
from kvmlet.boot.mptable import PciInterrupt, write_mp_table
from kvmlet.boot.placement import DEFAULT_CMDLINE_SIZE, load_initrd, write_command_line
from kvmlet.boot.x86_64 import BootCpuState, long_mode_entry, protected_mode_entry
from kvmlet.errors import KvmletError
from kvmlet.memory import GuestMemory

BootMethod = Literal["auto", "linux64", "pvh", "multiboot"]
BOOT_METHODS: tuple[BootMethod, ...] = ("auto", "linux64", "pvh", "multiboot")
NOT_A_KERNEL = "not a kernel kvmlet can boot: neither a bzImage, an ELF vmlinux nor multiboot"


class BootModule(NamedTuple):
    """A multiboot module: a file and the arguments the kernel gets with it."""

    path: str | os.PathLike[str]
    cmdline: str = ""


class KernelInfo(NamedTuple):
    """What kind of kernel a file holds and which entry points it offers."""

    format: Literal["bzImage", "elf", "multiboot"]
    has_64bit_entry: bool
    has_pvh_entry: bool
    has_multiboot: bool = False

    def boot_method(self, requested: BootMethod) -> Literal["linux64", "pvh", "multiboot"]:
        """The entry to use: `requested`, or for "auto" multiboot when the kernel has a
        multiboot header (no Linux kernel has one), else the 64-bit entry when there is one.

        The 64-bit entry wins over PVH because its zero page carries the RNG seed (elf.py).
        """
        if requested not in BOOT_METHODS:
            raise KvmletError(
                f"unknown boot method {requested!r}: use auto, linux64, pvh or multiboot"
            )
        if requested == "multiboot" or (requested == "auto" and self.has_multiboot):
            if not self.has_multiboot:
                raise KvmletError("kernel has no multiboot header in its first 8 KiB")
            return "multiboot"
        if self.format == "multiboot":
            raise KvmletError(f"a multiboot-only kernel cannot boot with {requested}")
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
    header = multiboot.find_header(data)
    if header is not None:
        multiboot.parse_image(data)  # a damaged multiboot image is refused before the boot
    if elf.is_elf(data):
        if len(data) > 4 and data[4] == multiboot.ELFCLASS32:
            if header is None:
                raise KvmletError("a 32-bit ELF kernel needs a multiboot header to boot")
            return KernelInfo("multiboot", False, False, has_multiboot=True)
        kernel = elf.parse_elf(data)
        has_entry, has_pvh = kernel.entry is not None, kernel.pvh_entry is not None
        return KernelInfo("elf", has_entry, has_pvh, has_multiboot=header is not None)
    from kvmlet.boot import bzimage  # only for a bzImage: an ELF boot never imports it

    if bzimage.is_bzimage(data):
        bzimage.parse_setup_header(data)
        return KernelInfo("bzImage", has_64bit_entry=True, has_pvh_entry=False)
    if header is not None:
        return KernelInfo("multiboot", False, False, has_multiboot=True)
    if multiboot.has_bad_checksum_header(data):
        raise KvmletError(f"{NOT_A_KERNEL} (its multiboot magic has a bad checksum)")
    raise KvmletError(NOT_A_KERNEL)


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
    modules: Sequence[BootModule] = (),
) -> BootCpuState:
    """Load a kernel (bzImage, ELF or multiboot), initrd or modules and command line; build
    the boot structures. A multiboot kernel gets `cmdline` as it is (see `multiboot.py`).

    Returns the state the boot vCPU must start in. Raises KvmletError for anything the user
    can fix: an unreadable or unbootable kernel, a command line too long, too little RAM.
    """
    loaded_modules = [_read_module(module) for module in modules]
    with _mapped_file(kernel_path, "kernel") as data:
        try:
            info = _describe(data)
            method = info.boot_method(boot_method)
            if method == "multiboot":
                if initrd_path is not None:
                    raise KvmletError("a multiboot kernel takes modules (--module), not an initrd")
                write_mp_table(memory, cpus, pci_interrupts)
                return multiboot.load_multiboot(memory, data, memory_map, cmdline, loaded_modules)
            if modules:
                raise KvmletError("boot modules (--module) are for multiboot kernels only")
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


def _read_module(module: BootModule) -> multiboot.Module:
    """A module's bytes and its string (the file name, then its arguments, as GRUB gives)."""
    name = os.fspath(module.path)
    try:
        with open(name, "rb") as file:
            data = file.read()
    except OSError as error:
        raise KvmletError(f"cannot read multiboot module {name}: {error.strerror}") from None
    return multiboot.Module(data, f"{name} {module.cmdline}" if module.cmdline else name)
