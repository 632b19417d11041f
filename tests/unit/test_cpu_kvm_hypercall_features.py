"""`HIDE_KVM_HYPERCALL_FEATURES`: the CPUID mask for hosts whose KVM never completes a
hypercall (no KVM needed). It must hide exactly the PV features a guest uses through
hypercalls and keep the ones it uses through MSRs and shared memory."""

from __future__ import annotations

from kvmlet.kvm.structs import KvmCpuidEntry2
from kvmlet.vstate import cpu

# What this repository's software KVM offers in CPUID 0x4000_0001 EAX: clocksource (0),
# NOP I/O delay (1), clocksource2 (3), async PF (4), steal time (5), PV EOI (6), PV unhalt (7),
# PV TLB flush (9), async PF VM exit (10), PV send IPI (11), poll control (12), PV sched
# yield (13), async PF interrupt (14), clocksource stable (24).
OFFERED = 0x0100_7EFB
WITHOUT_HYPERCALLS = 0x0100_567B  # bits 7, 11 and 13 cleared


def kvm_features(table: list[KvmCpuidEntry2]) -> int:
    return next(e.eax for e in table if e.function == cpu.CPUID_KVM_FEATURES)


def test_hypercall_features_are_pv_unhalt_send_ipi_sched_yield_and_map_gpa_range():
    assert cpu.KVM_HYPERCALL_FEATURES == (1 << 7) | (1 << 11) | (1 << 13) | (1 << 16)


def test_the_mask_clears_only_the_hypercall_features_on_every_vcpu():
    supported = [
        KvmCpuidEntry2(function=1, ebx=0x0002_0800, ecx=0x8120_2000),
        KvmCpuidEntry2(function=cpu.CPUID_KVM_FEATURES, eax=OFFERED),
    ]
    for vcpu_id in range(3):
        table = cpu.build_cpuid(supported, vcpu_id, 3, [cpu.HIDE_KVM_HYPERCALL_FEATURES])
        assert kvm_features(table) == WITHOUT_HYPERCALLS
        assert next(e.ebx for e in table if e.function == 1) >> 24 == vcpu_id
    assert kvm_features(supported) == OFFERED  # the host's table is left alone


def test_without_the_mask_the_guest_keeps_its_pv_ipis():
    supported = [KvmCpuidEntry2(function=cpu.CPUID_KVM_FEATURES, eax=OFFERED)]
    assert kvm_features(cpu.build_cpuid(supported, 0, 2)) == OFFERED
