"""A small VM for CPU-level tests: 2 MiB of RAM, a flat GDT and page tables a loader would write.

Layout (guest-physical): GDT at 0x500 with flat 64-bit code at selector 0x10, 4 GiB data at
0x18 and 32-bit code at 0x20; PML4 -> PDPT -> PD at 0x9000-0xB000 mapping the 2 MiB with one
large page, both at 0 and (PML4 slot 256) at `HIGHER_HALF`, where a Linux kernel runs. A
SIGALRM watchdog interrupts a KVM_RUN that would hang the test.
"""

from __future__ import annotations

import contextlib
import signal
import struct
from collections.abc import Iterator
from typing import NamedTuple

from kvmlet.kvm import Kvm, Vcpu, Vm
from kvmlet.memory import GuestMemory

RAM_SIZE = 0x20_0000
GDT = 0x500
PML4, PDPT, PD = 0x9000, 0xA000, 0xB000
HIGHER_HALF = 0xFFFF_8000_0000_0000
GDT_ENTRIES = (
    0,
    0,
    0x00AF_9B00_0000_FFFF,  # 0x10: 64-bit code, present, DPL 0
    0x00CF_9300_0000_FFFF,  # 0x18: data, 4 GiB flat
    0x00CF_9B00_0000_FFFF,  # 0x20: 32-bit code, 4 GiB flat
)
GDT_LIMIT = len(GDT_ENTRIES) * 8 - 1


class LongModeVm(NamedTuple):
    kvm: Kvm
    vm: Vm
    vcpu: Vcpu
    memory: GuestMemory


@contextlib.contextmanager
def long_mode_vm(watchdog_seconds: float) -> Iterator[LongModeVm]:
    """A VM with one vCPU (not yet configured) and the tables above written to its RAM."""
    previous = signal.signal(signal.SIGALRM, lambda *_: None)
    signal.setitimer(signal.ITIMER_REAL, watchdog_seconds)
    kvm = Kvm()
    vm = kvm.create_vm()
    memory = GuestMemory.anonymous([(0, RAM_SIZE)])
    try:
        vm.setup_x86_platform()
        vm.add_memory(0, RAM_SIZE, memory.banks[0].host_address())
        memory.write(GDT, struct.pack(f"<{len(GDT_ENTRIES)}Q", *GDT_ENTRIES))
        memory.write_u64(PML4, PDPT | 0x3)
        memory.write_u64(PML4 + 256 * 8, PDPT | 0x3)
        memory.write_u64(PDPT, PD | 0x3)
        memory.write_u64(PD, 0x0 | 0x83)  # 2 MiB page at 0, present + writable + large
        vcpu = vm.create_vcpu(0)
        try:
            yield LongModeVm(kvm, vm, vcpu, memory)
        finally:
            vcpu.close()
    finally:
        vm.close()
        memory.close()
        kvm.close()
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
