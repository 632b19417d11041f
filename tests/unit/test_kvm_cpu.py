"""CPUID table editing and boot MSR values of kvmlet.vstate.cpu (no KVM needed)."""

from __future__ import annotations

import struct

from kvmlet.kvm.structs import KvmCpuidEntry2
from kvmlet.vstate import cpu


def supported() -> list[KvmCpuidEntry2]:
    return [
        KvmCpuidEntry2(function=0, eax=0xD),
        KvmCpuidEntry2(function=1, eax=0x806F8, ebx=0xFF00_0042, ecx=0x7EDA_3203, edx=0x178B_FBFF),
        KvmCpuidEntry2(function=0xB, index=0, ecx=0x100, edx=0x55),
        KvmCpuidEntry2(function=0xB, index=1, ecx=0x201, edx=0x55),
        KvmCpuidEntry2(function=cpu.CPUID_KVM_FEATURES, eax=0x0100_00FB),
        KvmCpuidEntry2(function=0x8000_0008, eax=0x3030, ecx=0x3_7001),  # host: 2 cores
    ]


def leaf(table, function, index=0):
    return next(e for e in table if e.function == function and e.index == index)


def test_apic_id_logical_count_and_hypervisor_bit_in_leaf_1():
    table = cpu.build_cpuid(supported(), vcpu_id=3, vcpu_count=4)
    features = leaf(table, 1)
    assert features.ebx >> 24 == 3
    assert (features.ebx >> 16) & 0xFF == 4
    assert features.ebx & 0xFF == 0x42
    assert features.ecx & cpu.LEAF1_ECX_HYPERVISOR
    assert features.edx & cpu.LEAF1_EDX_HTT


def test_x2apic_id_in_every_topology_subleaf():
    table = cpu.build_cpuid(supported(), vcpu_id=5, vcpu_count=8)
    assert leaf(table, 0xB, 0).edx == 5
    assert leaf(table, 0xB, 1).edx == 5


def test_amd_core_count_is_the_vcpu_count_not_the_hosts():
    for vcpu_count, core_id_bits in ((1, 1), (4, 2), (5, 3), (64, 6)):
        ecx = leaf(cpu.build_cpuid(supported(), 0, vcpu_count), 0x8000_0008).ecx
        assert ecx & 0xFF == vcpu_count - 1
        assert (ecx >> 12) & 0xF == core_id_bits
        assert ecx >> 16 == 0x3  # the other bits are KVM's


def test_kvm_signature_leaf_is_added_and_features_kept():
    table = cpu.build_cpuid(supported(), vcpu_id=0, vcpu_count=1)
    signature = leaf(table, cpu.CPUID_KVM_SIGNATURE)
    assert struct.pack("<III", signature.ebx, signature.ecx, signature.edx) == b"KVMKVMKVM\0\0\0"
    assert signature.eax >= cpu.CPUID_KVM_FEATURES
    assert leaf(table, cpu.CPUID_KVM_FEATURES).eax == 0x0100_00FB
    assert not leaf(table, 1).edx & cpu.LEAF1_EDX_HTT


def test_masks_clear_only_their_bits_and_the_input_is_untouched():
    original = supported()
    mask = cpu.CpuidMask(1, "ecx", 1 << 13)
    table = cpu.build_cpuid(original, vcpu_id=0, vcpu_count=1, masks=[mask])
    assert leaf(table, 1).ecx == (0x7EDA_3203 | cpu.LEAF1_ECX_HYPERVISOR) & ~(1 << 13)
    assert leaf(original, 1).ecx == 0x7EDA_3203
    assert leaf(original, 1).ebx == 0xFF00_0042


def test_mask_on_one_subleaf_leaves_the_others():
    mask = cpu.CpuidMask(0xB, "ecx", 0xFF, index=1)
    table = cpu.build_cpuid(supported(), vcpu_id=0, vcpu_count=1, masks=[mask])
    assert leaf(table, 0xB, 0).ecx == 0x100
    assert leaf(table, 0xB, 1).ecx == 0x200


def test_boot_msrs_enable_fast_strings_and_write_back_mtrr():
    msrs = cpu.boot_msrs()
    assert msrs[cpu.MSR_IA32_MISC_ENABLE] & cpu.MISC_ENABLE_FAST_STRING
    assert msrs[cpu.MSR_MTRR_DEF_TYPE] == (1 << 11) | 6
    assert msrs[cpu.MSR_LSTAR] == 0


class FakeKvm:
    """What `cpu.supported_cpuid` asks of a Kvm: its CPUID and one capability."""

    def __init__(self, tsc_deadline: int):
        self.tsc_deadline = tsc_deadline

    def supported_cpuid(self):
        return supported()

    def check_extension(self, capability: int) -> int:
        assert capability == 72  # KVM_CAP_TSC_DEADLINE_TIMER
        return self.tsc_deadline


def test_tsc_deadline_timer_is_offered_exactly_when_kvm_has_it():
    with_it = leaf(cpu.supported_cpuid(FakeKvm(1)), 1)
    without = leaf(cpu.supported_cpuid(FakeKvm(0)), 1)
    assert with_it.ecx & cpu.LEAF1_ECX_TSC_DEADLINE
    assert not without.ecx & cpu.LEAF1_ECX_TSC_DEADLINE
    assert with_it.ecx & ~cpu.LEAF1_ECX_TSC_DEADLINE == without.ecx  # nothing else changes
