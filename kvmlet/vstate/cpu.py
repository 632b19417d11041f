"""x86 vCPU set-up: CPUID, boot MSRs, FPU, local APIC and the boot register state.

What the Linux boot protocols need from a freshly created vCPU, done the way kvmtool and
Firecracker do it: the CPUID KVM supports with a KVM signature leaf, per-vCPU APIC IDs and
the hypervisor bit; MSRs with defined boot values; an x87/SSE control state; LINT0 as ExtINT
(the PIC's virtual wire) and LINT1 as NMI; and the registers of a `BootCpuState` (long mode
for the 64-bit boot protocol, flat 32-bit protected mode for the PVH entry) produced by the
loaders, which also place the GDT and page tables in guest memory. Only the boot vCPU gets
registers: KVM creates the others waiting for INIT/SIPI (KVM_MP_STATE_UNINITIALIZED) and the
guest starts them through its local APIC, as on hardware.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from typing import Literal, NamedTuple

from kvmlet.boot.x86_64 import BootCpuState
from kvmlet.kvm import Kvm, Vcpu
from kvmlet.kvm.ioctls import KVM_CAP_TSC_DEADLINE_TIMER
from kvmlet.kvm.structs import KvmCpuidEntry2, KvmFpu, KvmLapicState, KvmSegment

# CPUID
CPUID_FEATURES = 0x1
CPUID_EXTENDED_TOPOLOGY = 0xB
CPUID_AMD_SIZE_IDENTIFIERS = 0x8000_0008
AMD_CORE_COUNT_MASK = 0xF0FF
"""0x8000_0008 ECX: NC (cores - 1, bits 7:0) and ApicIdCoreIdSize (bits 15:12)."""
CPUID_KVM_SIGNATURE = 0x4000_0000
CPUID_KVM_FEATURES = 0x4000_0001
KVM_SIGNATURE = b"KVMKVMKVM\0\0\0"
# KVM paravirtual features in CPUID 0x4000_0001 EAX (Documentation/virt/kvm/x86/cpuid.rst)
KVM_FEATURE_PV_UNHALT = 1 << 7
KVM_FEATURE_PV_SEND_IPI = 1 << 11
KVM_FEATURE_PV_SCHED_YIELD = 1 << 13
KVM_FEATURE_HC_MAP_GPA_RANGE = 1 << 16
KVM_HYPERCALL_FEATURES = (
    KVM_FEATURE_PV_UNHALT
    | KVM_FEATURE_PV_SEND_IPI
    | KVM_FEATURE_PV_SCHED_YIELD
    | KVM_FEATURE_HC_MAP_GPA_RANGE
)
"""The PV features a guest uses by making hypercalls (VMCALL/VMMCALL): KVM_HC_KICK_CPU for PV
spinlocks, KVM_HC_SEND_IPI, KVM_HC_SCHED_YIELD and KVM_HC_MAP_GPA_RANGE. A Linux guest with
more than one vCPU makes the first of them as soon as an application processor comes up."""
LEAF1_ECX_TSC_DEADLINE = 1 << 24
LEAF1_ECX_HYPERVISOR = 1 << 31
LEAF1_EDX_HTT = 1 << 28
CLFLUSH_LINE_SIZE_QWORDS = 8

# MSRs (Intel SDM vol. 4)
MSR_IA32_TSC = 0x10
MSR_IA32_SYSENTER_CS = 0x174
MSR_IA32_SYSENTER_ESP = 0x175
MSR_IA32_SYSENTER_EIP = 0x176
MSR_IA32_MISC_ENABLE = 0x1A0
MSR_MTRR_DEF_TYPE = 0x2FF
MSR_STAR = 0xC000_0081
MSR_LSTAR = 0xC000_0082
MSR_CSTAR = 0xC000_0083
MSR_SYSCALL_MASK = 0xC000_0084
MSR_KERNEL_GS_BASE = 0xC000_0102
MISC_ENABLE_FAST_STRING = 1 << 0
MTRR_ENABLE = 1 << 11
MTRR_TYPE_WRITE_BACK = 6

# Control registers
CR0_PE = 1 << 0
CR0_ET = 1 << 4
CR0_NE = 1 << 5
CR0_PG = 1 << 31
CR4_PAE = 1 << 5
EFER_LME = 1 << 8
EFER_LMA = 1 << 10
RFLAGS_RESERVED_ONE = 1 << 1

# Local APIC
APIC_LVT_LINT0 = 0x350
APIC_LVT_LINT1 = 0x360
APIC_DELIVERY_MODE_MASK = 0x700
APIC_MODE_NMI = 0x4
APIC_MODE_EXTINT = 0x7

FPU_CONTROL_WORD = 0x37F
MXCSR_DEFAULT = 0x1F80

_U32 = struct.Struct("<I")


class CpuidMask(NamedTuple):
    """Feature bits to clear in one CPUID register (`index` None: every sub-leaf)."""

    function: int
    register: Literal["eax", "ebx", "ecx", "edx"]
    bits: int
    index: int | None = None


HIDE_KVM_HYPERCALL_FEATURES = CpuidMask(CPUID_KVM_FEATURES, "eax", KVM_HYPERCALL_FEATURES)
"""For a host whose KVM never completes a hypercall: the guest then uses its native paths
(IPIs through the local APIC's ICR, plain queued spinlocks, no directed yield)."""


def supported_cpuid(kvm: Kvm) -> list[KvmCpuidEntry2]:
    """KVM_GET_SUPPORTED_CPUID plus the TSC-deadline timer when KVM has it.

    KVM never reports that bit itself: it depends on the in-kernel local APIC, which every
    kvmlet VM has (Documentation/virt/kvm/api.rst, KVM_GET_SUPPORTED_CPUID). Without it a
    Linux guest programs its APIC timer through MMIO, a trapped and emulated instruction each
    time, instead of one MSR write.
    """
    table = kvm.supported_cpuid()
    if kvm.check_extension(KVM_CAP_TSC_DEADLINE_TIMER) > 0:
        for entry in table:
            if entry.function == CPUID_FEATURES:
                entry.ecx |= LEAF1_ECX_TSC_DEADLINE
    return table


def build_cpuid(
    supported: Sequence[KvmCpuidEntry2],
    vcpu_id: int,
    vcpu_count: int,
    masks: Iterable[CpuidMask] = (),
) -> list[KvmCpuidEntry2]:
    """The CPUID table for one vCPU from KVM_GET_SUPPORTED_CPUID (the input is not changed)."""
    table = [KvmCpuidEntry2.from_buffer_copy(entry) for entry in supported]
    if not any(entry.function == CPUID_KVM_SIGNATURE for entry in table):
        table.append(KvmCpuidEntry2(function=CPUID_KVM_SIGNATURE))
    for entry in table:
        if entry.function == CPUID_FEATURES:
            entry.ebx = (
                (vcpu_id & 0xFF) << 24
                | (min(vcpu_count, 0xFF) << 16)
                | (CLFLUSH_LINE_SIZE_QWORDS << 8)
                | (entry.ebx & 0xFF)
            )
            entry.ecx |= LEAF1_ECX_HYPERVISOR
            entry.edx = entry.edx | LEAF1_EDX_HTT if vcpu_count > 1 else entry.edx & ~LEAF1_EDX_HTT
        elif entry.function == CPUID_EXTENDED_TOPOLOGY:
            entry.edx = vcpu_id
        elif entry.function == CPUID_AMD_SIZE_IDENTIFIERS:
            # KVM passes the host's core count through; an AMD guest would count packages
            # from it. One package holding every vCPU, APIC IDs 0..n-1 as core IDs.
            cores = min(vcpu_count, 0x100)
            core_id_bits = max(1, (cores - 1).bit_length())
            entry.ecx = entry.ecx & ~AMD_CORE_COUNT_MASK | core_id_bits << 12 | (cores - 1)
        elif entry.function == CPUID_KVM_SIGNATURE:
            entry.eax = max(entry.eax, CPUID_KVM_FEATURES)
            entry.ebx, entry.ecx, entry.edx = struct.unpack("<III", KVM_SIGNATURE)
    for mask in masks:
        for entry in table:
            if entry.function == mask.function and mask.index in (None, entry.index):
                setattr(entry, mask.register, getattr(entry, mask.register) & ~mask.bits)
    return table


def boot_msrs() -> dict[int, int]:
    """MSR values a booting kernel may rely on (kvmtool's and Firecracker's set)."""
    return {
        MSR_IA32_SYSENTER_CS: 0,
        MSR_IA32_SYSENTER_ESP: 0,
        MSR_IA32_SYSENTER_EIP: 0,
        MSR_STAR: 0,
        MSR_CSTAR: 0,
        MSR_KERNEL_GS_BASE: 0,
        MSR_SYSCALL_MASK: 0,
        MSR_LSTAR: 0,
        MSR_IA32_TSC: 0,
        MSR_IA32_MISC_ENABLE: MISC_ENABLE_FAST_STRING,
        MSR_MTRR_DEF_TYPE: MTRR_ENABLE | MTRR_TYPE_WRITE_BACK,
    }


def setup_fpu(vcpu: Vcpu) -> None:
    """x87 control word and MXCSR at their architectural reset values."""
    vcpu.set_fpu(KvmFpu(fcw=FPU_CONTROL_WORD, mxcsr=MXCSR_DEFAULT))


def _with_delivery_mode(register: int, mode: int) -> int:
    return (register & ~APIC_DELIVERY_MODE_MASK) | (mode << 8)


def setup_lapic(vcpu: Vcpu) -> None:
    """LINT0 delivers the PIC's interrupts (ExtINT), LINT1 delivers NMIs."""
    registers = bytearray(bytes(vcpu.get_lapic()))
    for offset, mode in ((APIC_LVT_LINT0, APIC_MODE_EXTINT), (APIC_LVT_LINT1, APIC_MODE_NMI)):
        (value,) = _U32.unpack_from(registers, offset)
        _U32.pack_into(registers, offset, _with_delivery_mode(value, mode))
    vcpu.set_lapic(KvmLapicState.from_buffer_copy(registers))


def configure_vcpu(
    vcpu: Vcpu,
    supported_cpuid: Sequence[KvmCpuidEntry2],
    vcpu_count: int,
    cpuid_masks: Iterable[CpuidMask] = (),
) -> None:
    """CPUID, boot MSRs, FPU and LAPIC of a new vCPU (registers come from `apply_boot_state`).

    LAPIC set-up needs the in-kernel irqchip (`Vm.setup_x86_platform`).
    """
    vcpu.set_cpuid2(build_cpuid(supported_cpuid, vcpu.id, vcpu_count, cpuid_masks))
    vcpu.set_msrs(boot_msrs())
    setup_fpu(vcpu)
    setup_lapic(vcpu)


def _flat_segment(segment: KvmSegment, selector: int, *, code: bool, long_mode: bool) -> None:
    segment.base = 0
    segment.limit = 0xFFFF_FFFF
    segment.selector = selector
    segment.type = 0xB if code else 0x3  # execute/read, accessed | read/write, accessed
    segment.present = 1
    segment.dpl = 0
    segment.s = 1
    segment.g = 1
    segment.avl = 0
    segment.unusable = 0
    segment.l = 1 if code and long_mode else 0
    segment.db = 0 if code and long_mode else 1


def apply_boot_state(vcpu: Vcpu, state: BootCpuState) -> None:
    """Set special and general registers so the vCPU starts at `state.entry`."""
    if state.mode not in ("long64", "protected32"):
        raise ValueError(f"unknown boot CPU mode {state.mode!r}")
    long_mode = state.mode == "long64"
    sregs = vcpu.get_sregs()
    _flat_segment(sregs.cs, state.code_selector, code=True, long_mode=long_mode)
    for data in (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss):
        _flat_segment(data, state.data_selector, code=False, long_mode=long_mode)
    sregs.gdt.base = state.gdt_base
    sregs.gdt.limit = state.gdt_limit
    if long_mode:
        sregs.cr0 = CR0_PE | CR0_ET | CR0_NE | CR0_PG
        sregs.cr3 = state.cr3
        sregs.cr4 = CR4_PAE
        sregs.efer = EFER_LME | EFER_LMA
    else:
        sregs.cr0 = CR0_PE | CR0_ET
        sregs.cr3 = 0
        sregs.cr4 = 0
        sregs.efer = 0
    vcpu.set_sregs(sregs)
    regs = vcpu.get_regs()
    for name in ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp"):
        setattr(regs, name, 0)
    regs.rip = state.entry
    regs.rsi = state.rsi
    regs.rbx = state.rbx
    regs.rax = state.rax
    regs.rflags = RFLAGS_RESERVED_ONE
    vcpu.set_regs(regs)


def start_real_mode(vcpu: Vcpu, address: int) -> None:
    """Start the vCPU in real mode at physical `address` (below 1 MiB): CS:IP = segment:0."""
    if not 0 <= address < 0x100000 or address & 0xF:
        raise ValueError(f"real-mode start {address:#x} must be 16-byte aligned below 1 MiB")
    sregs = vcpu.get_sregs()
    sregs.cs.selector = address >> 4
    sregs.cs.base = address
    vcpu.set_sregs(sregs)
    regs = vcpu.get_regs()
    regs.rip = 0
    regs.rflags = RFLAGS_RESERVED_ONE
    vcpu.set_regs(regs)
