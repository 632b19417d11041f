"""ctypes mirrors of the KVM structures in <linux/kvm.h> and <asm/kvm.h> (x86_64).

Field names and order follow the kernel headers so that the kernel documentation applies
unchanged. Structures ending in a flexible array (`kvm_msrs`, `kvm_cpuid2`, `kvm_msr_list`,
`kvm_irq_routing`) are declared with their fixed header only (that is what `sizeof` and the
ioctl numbers use); `*_with(n)` builds the variant carrying `n` entries for a call.
"""

from __future__ import annotations

import ctypes
from functools import cache

u8 = ctypes.c_uint8
u16 = ctypes.c_uint16
u32 = ctypes.c_uint32
s32 = ctypes.c_int32
u64 = ctypes.c_uint64


class KvmUserspaceMemoryRegion(ctypes.Structure):
    _fields_ = [
        ("slot", u32),
        ("flags", u32),
        ("guest_phys_addr", u64),
        ("memory_size", u64),
        ("userspace_addr", u64),
    ]


class KvmIrqLevel(ctypes.Structure):
    _fields_ = [("irq", u32), ("level", u32)]


class KvmPitConfig(ctypes.Structure):
    _fields_ = [("flags", u32), ("pad", u32 * 15)]


_GENERAL_REGISTERS = "rax rbx rcx rdx rsi rdi rsp rbp r8 r9 r10 r11 r12 r13 r14 r15 rip rflags"


class KvmRegs(ctypes.Structure):
    _fields_ = [(name, u64) for name in _GENERAL_REGISTERS.split()]


class KvmSegment(ctypes.Structure):
    _fields_ = [
        ("base", u64),
        ("limit", u32),
        ("selector", u16),
        ("type", u8),
        ("present", u8),
        ("dpl", u8),
        ("db", u8),
        ("s", u8),
        ("l", u8),
        ("g", u8),
        ("avl", u8),
        ("unusable", u8),
        ("padding", u8),
    ]


class KvmDtable(ctypes.Structure):
    _fields_ = [("base", u64), ("limit", u16), ("padding", u16 * 3)]


class KvmSregs(ctypes.Structure):
    _fields_ = [
        *((name, KvmSegment) for name in ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")),
        ("gdt", KvmDtable),
        ("idt", KvmDtable),
        *((name, u64) for name in ("cr0", "cr2", "cr3", "cr4", "cr8", "efer", "apic_base")),
        ("interrupt_bitmap", u64 * 4),
    ]


class KvmFpu(ctypes.Structure):
    _fields_ = [
        ("fpr", (u8 * 16) * 8),
        ("fcw", u16),
        ("fsw", u16),
        ("ftwx", u8),
        ("pad1", u8),
        ("last_opcode", u16),
        ("last_ip", u64),
        ("last_dp", u64),
        ("xmm", (u8 * 16) * 16),
        ("mxcsr", u32),
        ("pad2", u32),
    ]


class KvmMsrEntry(ctypes.Structure):
    _fields_ = [("index", u32), ("reserved", u32), ("data", u64)]


class KvmMsrs(ctypes.Structure):
    _fields_ = [("nmsrs", u32), ("pad", u32)]


class KvmMsrList(ctypes.Structure):
    _fields_ = [("nmsrs", u32)]


class KvmCpuidEntry2(ctypes.Structure):
    _fields_ = [
        ("function", u32),
        ("index", u32),
        ("flags", u32),
        ("eax", u32),
        ("ebx", u32),
        ("ecx", u32),
        ("edx", u32),
        ("padding", u32 * 3),
    ]


class KvmCpuid2(ctypes.Structure):
    _fields_ = [("nent", u32), ("padding", u32)]


class KvmIrqfd(ctypes.Structure):
    _fields_ = [
        ("fd", u32),
        ("gsi", u32),
        ("flags", u32),
        ("resamplefd", u32),
        ("pad", u8 * 16),
    ]


class KvmIoeventfd(ctypes.Structure):
    _fields_ = [
        ("datamatch", u64),
        ("addr", u64),
        ("len", u32),
        ("fd", s32),
        ("flags", u32),
        ("pad", u8 * 36),
    ]


class KvmCoalescedMmioZone(ctypes.Structure):
    """A range whose guest writes KVM appends to the coalesced ring (`pio`: port I/O)."""

    _fields_ = [("addr", u64), ("size", u32), ("pio", u32)]


class KvmIrqRoutingIrqchip(ctypes.Structure):
    _fields_ = [("irqchip", u32), ("pin", u32)]


class KvmIrqRoutingMsi(ctypes.Structure):
    _fields_ = [("address_lo", u32), ("address_hi", u32), ("data", u32), ("devid", u32)]


class KvmIrqRoutingUnion(ctypes.Union):
    _fields_ = [("irqchip", KvmIrqRoutingIrqchip), ("msi", KvmIrqRoutingMsi), ("pad", u32 * 8)]


class KvmIrqRoutingEntry(ctypes.Structure):
    _fields_ = [
        ("gsi", u32),
        ("type", u32),
        ("flags", u32),
        ("pad", u32),
        ("u", KvmIrqRoutingUnion),
    ]


class KvmIrqRouting(ctypes.Structure):
    _fields_ = [("nr", u32), ("flags", u32)]


class KvmMsi(ctypes.Structure):
    _fields_ = [
        ("address_lo", u32),
        ("address_hi", u32),
        ("data", u32),
        ("flags", u32),
        ("devid", u32),
        ("pad", u8 * 12),
    ]


class _EventException(ctypes.Structure):
    _fields_ = [
        ("injected", u8),
        ("nr", u8),
        ("has_error_code", u8),
        ("pending", u8),
        ("error_code", u32),
    ]


class _EventInterrupt(ctypes.Structure):
    _fields_ = [("injected", u8), ("nr", u8), ("soft", u8), ("shadow", u8)]


class _EventNmi(ctypes.Structure):
    _fields_ = [("injected", u8), ("pending", u8), ("masked", u8), ("pad", u8)]


class _EventSmi(ctypes.Structure):
    _fields_ = [("smm", u8), ("pending", u8), ("smm_inside_nmi", u8), ("latched_init", u8)]


class _EventTripleFault(ctypes.Structure):
    _fields_ = [("pending", u8)]


class KvmVcpuEvents(ctypes.Structure):
    _fields_ = [
        ("exception", _EventException),
        ("interrupt", _EventInterrupt),
        ("nmi", _EventNmi),
        ("sipi_vector", u32),
        ("flags", u32),
        ("smi", _EventSmi),
        ("triple_fault", _EventTripleFault),
        ("reserved", u8 * 26),
        ("exception_has_payload", u8),
        ("exception_payload", u64),
    ]


KVM_APIC_REG_SIZE = 0x400


class KvmLapicState(ctypes.Structure):
    _fields_ = [("regs", ctypes.c_char * KVM_APIC_REG_SIZE)]


class KvmMpState(ctypes.Structure):
    _fields_ = [("mp_state", u32)]


class KvmClockData(ctypes.Structure):
    """KVM_GET_CLOCK/KVM_SET_CLOCK: the VM's kvmclock in nanoseconds (and what it was read at)."""

    _fields_ = [
        ("clock", u64),
        ("flags", u32),
        ("pad0", u32),
        ("realtime", u64),
        ("host_tsc", u64),
        ("pad", u32 * 4),
    ]


class KvmXsave(ctypes.Structure):
    """KVM_GET_XSAVE/KVM_SET_XSAVE: the vCPU's XSAVE area (x87, SSE, AVX... as the host's CPUID
    leaf 0xD lays it out); KVM_GET_XSAVE2 may fill more than these 4 KiB (KVM_CAP_XSAVE2)."""

    _fields_ = [("region", u32 * 1024)]


class KvmXcr(ctypes.Structure):
    _fields_ = [("xcr", u32), ("reserved", u32), ("value", u64)]


KVM_MAX_XCRS = 16


class KvmXcrs(ctypes.Structure):
    _fields_ = [
        ("nr_xcrs", u32),
        ("flags", u32),
        ("xcrs", KvmXcr * KVM_MAX_XCRS),
        ("padding", u64 * 16),
    ]


class KvmDebugregs(ctypes.Structure):
    _fields_ = [
        ("db", u64 * 4),
        ("dr6", u64),
        ("dr7", u64),
        ("flags", u64),
        ("reserved", u64 * 9),
    ]


class KvmIrqchip(ctypes.Structure):
    """KVM_GET_IRQCHIP/KVM_SET_IRQCHIP: one in-kernel chip (PIC master, PIC slave or IOAPIC),
    its `kvm_pic_state` or `kvm_ioapic_state` in the 512-byte union kept as bytes."""

    _fields_ = [("chip_id", u32), ("pad", u32), ("chip", u8 * 512)]


class KvmPitChannelState(ctypes.Structure):
    _fields_ = [
        ("count", u32),
        ("latched_count", u16),
        ("count_latched", u8),
        ("status_latched", u8),
        ("status", u8),
        ("read_state", u8),
        ("write_state", u8),
        ("write_latch", u8),
        ("rw_mode", u8),
        ("mode", u8),
        ("bcd", u8),
        ("gate", u8),
        ("count_load_time", ctypes.c_int64),
    ]


class KvmPitState2(ctypes.Structure):
    _fields_ = [("channels", KvmPitChannelState * 3), ("flags", u32), ("reserved", u32 * 9)]


# struct kvm_run: the header, then the exit-reason union (256 bytes), then the register
# synchronisation area. kvmlet decodes the run page with struct offsets taken from these
# declarations (see exits.py), so the declarations are the single source of the layout.


class RunIo(ctypes.Structure):
    _fields_ = [
        ("direction", u8),
        ("size", u8),
        ("port", u16),
        ("count", u32),
        ("data_offset", u64),
    ]


class RunMmio(ctypes.Structure):
    _fields_ = [("phys_addr", u64), ("data", u8 * 8), ("len", u32), ("is_write", u8)]


class RunFailEntry(ctypes.Structure):
    _fields_ = [("hardware_entry_failure_reason", u64), ("cpu", u32)]


class RunInternal(ctypes.Structure):
    _fields_ = [("suberror", u32), ("ndata", u32), ("data", u64 * 16)]


class RunSystemEvent(ctypes.Structure):
    _fields_ = [("type", u32), ("ndata", u32), ("data", u64 * 16)]


class RunExitUnion(ctypes.Union):
    _fields_ = [
        ("io", RunIo),
        ("mmio", RunMmio),
        ("fail_entry", RunFailEntry),
        ("internal", RunInternal),
        ("system_event", RunSystemEvent),
        ("padding", ctypes.c_char * 256),
    ]


class KvmRun(ctypes.Structure):
    _fields_ = [
        ("request_interrupt_window", u8),
        ("immediate_exit", u8),
        ("padding1", u8 * 6),
        ("exit_reason", u32),
        ("ready_for_interrupt_injection", u8),
        ("if_flag", u8),
        ("flags", u16),
        ("cr8", u64),
        ("apic_base", u64),
        ("exit", RunExitUnion),
        ("kvm_valid_regs", u64),
        ("kvm_dirty_regs", u64),
        ("sync_regs", ctypes.c_char * 2048),
    ]


@cache
def _with_entries(header: type, entry: type, count: int) -> type:
    return type(
        f"{header.__name__}With{count}",
        (ctypes.Structure,),
        {"_fields_": [("header", header), ("entries", entry * count)]},
    )


def msrs_with(count: int) -> type:
    """`struct kvm_msrs` carrying `count` entries (fields: header.nmsrs, entries)."""
    return _with_entries(KvmMsrs, KvmMsrEntry, count)


def cpuid2_with(count: int) -> type:
    """`struct kvm_cpuid2` carrying `count` entries (fields: header.nent, entries)."""
    return _with_entries(KvmCpuid2, KvmCpuidEntry2, count)


def msr_list_with(count: int) -> type:
    """`struct kvm_msr_list` carrying room for `count` indices."""
    return _with_entries(KvmMsrList, u32, count)


def irq_routing_with(count: int) -> type:
    """`struct kvm_irq_routing` carrying `count` entries (fields: header.nr, entries)."""
    return _with_entries(KvmIrqRouting, KvmIrqRoutingEntry, count)
