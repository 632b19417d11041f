"""Boot loaders: a Linux kernel (bzImage or ELF vmlinux), initrd and command line into guest
memory, with the boot-time structures (zero page or PVH start_info, MP table, GDT, page tables);
or a multiboot kernel with its modules and information structure.

Entry points: `load_kernel` (the machine) and `inspect_kernel` (early checks in the CLI).
"""

from kvmlet.boot.loader import (
    BOOT_METHODS,
    BootMethod,
    BootModule,
    KernelInfo,
    inspect_kernel,
    load_kernel,
)
from kvmlet.boot.mptable import PciInterrupt

__all__ = [
    "BOOT_METHODS",
    "BootMethod",
    "BootModule",
    "KernelInfo",
    "PciInterrupt",
    "inspect_kernel",
    "load_kernel",
]
