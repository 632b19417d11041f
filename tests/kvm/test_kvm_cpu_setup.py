"""vCPU set-up of kvmlet.vstate.cpu on /dev/kvm: long mode and 32-bit protected mode boot
states, CPUID the guest sees, boot MSRs and LAPIC wiring, with tiny guests of our own.

The VM (tests/helpers/long_mode_vm.py) holds what a loader would write: a flat GDT and a
2 MiB identity map.
"""

from __future__ import annotations

import struct

import pytest

from kvmlet.boot.x86_64 import BootCpuState
from kvmlet.kvm import IoExit
from kvmlet.vstate import cpu
from tests.helpers.long_mode_vm import GDT, GDT_LIMIT, PML4, long_mode_vm

pytestmark = pytest.mark.kvm

CODE = 0x1000


@pytest.fixture
def machine():
    with long_mode_vm(watchdog_seconds=2.0) as guest:
        yield guest.kvm, guest.vcpu, guest.memory


def long_mode(entry: int = CODE, rsi: int = 0) -> BootCpuState:
    return BootCpuState("long64", entry, rsi=rsi, cr3=PML4, gdt_base=GDT, gdt_limit=GDT_LIMIT)


def out_value(vcpu) -> int:
    exit = vcpu.run()
    assert isinstance(exit, IoExit) and exit.is_write, exit
    assert exit.port == 0x10
    return int.from_bytes(exit.data, "little")


def test_long_mode_guest_runs_at_entry_with_rsi(machine):
    kvm, vcpu, memory = machine
    memory.write(
        CODE,
        bytes.fromhex("4889f0")  # mov rax, rsi
        + bytes.fromhex("e710")  # out 0x10, eax
        + bytes.fromhex("48c1e820")  # shr rax, 32
        + bytes.fromhex("e710"),  # out 0x10, eax
    )
    cpu.configure_vcpu(vcpu, kvm.supported_cpuid(), vcpu_count=1)
    cpu.apply_boot_state(vcpu, long_mode(rsi=0x1234_5678_9ABC))
    assert out_value(vcpu) == 0x5678_9ABC
    assert out_value(vcpu) == 0x1234
    sregs = vcpu.get_sregs()
    assert sregs.efer & cpu.EFER_LMA and sregs.cs.l == 1 and sregs.cs.selector == 0x10
    assert sregs.ds.selector == 0x18


def test_protected_mode_entry_with_rbx_and_paging_off(machine):
    kvm, vcpu, memory = machine
    memory.write(
        CODE,
        bytes.fromhex("89d8")  # mov eax, ebx
        + bytes.fromhex("e710")  # out 0x10, eax
        + bytes.fromhex("0f20c0")  # mov eax, cr0
        + bytes.fromhex("e710"),  # out 0x10, eax
    )
    cpu.configure_vcpu(vcpu, kvm.supported_cpuid(), vcpu_count=1)
    state = BootCpuState(
        "protected32", CODE, rbx=0x6000, gdt_base=GDT, gdt_limit=GDT_LIMIT, code_selector=0x20
    )
    cpu.apply_boot_state(vcpu, state)
    assert out_value(vcpu) == 0x6000
    cr0 = out_value(vcpu)
    assert cr0 & cpu.CR0_PE and not cr0 & cpu.CR0_PG


def test_guest_sees_apic_id_count_hypervisor_bit_and_kvm_signature(machine):
    kvm, vcpu, memory = machine
    memory.write(
        CODE,
        bytes.fromhex("b801000000")  # mov eax, 1
        + bytes.fromhex("0fa2")  # cpuid
        + bytes.fromhex("89d8")  # mov eax, ebx
        + bytes.fromhex("e710")  # out 0x10, eax
        + bytes.fromhex("89c8")  # mov eax, ecx
        + bytes.fromhex("e710")  # out 0x10, eax
        + bytes.fromhex("b800000040")  # mov eax, 0x40000000
        + bytes.fromhex("0fa2")  # cpuid
        + bytes.fromhex("89d8")  # mov eax, ebx
        + bytes.fromhex("e710"),  # out 0x10, eax
    )
    mask = cpu.CpuidMask(1, "ecx", 1 << 13)
    cpu.configure_vcpu(vcpu, kvm.supported_cpuid(), vcpu_count=2, cpuid_masks=[mask])
    cpu.apply_boot_state(vcpu, long_mode())
    ebx = out_value(vcpu)
    assert ebx >> 24 == 0 and (ebx >> 16) & 0xFF == 2
    ecx = out_value(vcpu)
    assert ecx & cpu.LEAF1_ECX_HYPERVISOR and not ecx & (1 << 13)
    assert out_value(vcpu).to_bytes(4, "little") == b"KVMK"


def test_boot_msrs_and_lapic_lines_are_set(machine):
    kvm, vcpu, _ = machine
    cpu.configure_vcpu(vcpu, kvm.supported_cpuid(), vcpu_count=1)
    msrs = vcpu.get_msrs([cpu.MSR_IA32_MISC_ENABLE, cpu.MSR_MTRR_DEF_TYPE, cpu.MSR_LSTAR])
    assert msrs[cpu.MSR_IA32_MISC_ENABLE] & cpu.MISC_ENABLE_FAST_STRING
    assert msrs[cpu.MSR_MTRR_DEF_TYPE] == cpu.MTRR_ENABLE | cpu.MTRR_TYPE_WRITE_BACK
    assert msrs[cpu.MSR_LSTAR] == 0
    lapic = bytes(vcpu.get_lapic())
    (lint0,) = struct.unpack_from("<I", lapic, cpu.APIC_LVT_LINT0)
    (lint1,) = struct.unpack_from("<I", lapic, cpu.APIC_LVT_LINT1)
    assert (lint0 >> 8) & 7 == cpu.APIC_MODE_EXTINT
    assert (lint1 >> 8) & 7 == cpu.APIC_MODE_NMI
    assert vcpu.get_fpu().fcw == cpu.FPU_CONTROL_WORD
