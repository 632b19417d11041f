"""What a snapshot asks of the host's CPU, and which MSRs it carries (no KVM needed)."""

from __future__ import annotations

import pytest

from kvmlet.errors import KvmletError
from kvmlet.kvm.structs import KvmCpuidEntry2
from kvmlet.vstate.vcpu_state import (
    MSR_IA32_TSC,
    MSR_IA32_TSC_DEADLINE,
    check_cpu_compatible,
    cpu_signature,
    cpuid_entries,
    snapshot_msrs,
)

AMD = (0x6874_7541, 0x444D_4163, 0x6974_6E65)  # "AuthenticAMD" in EBX, ECX, EDX
INTEL = (0x756E_6547, 0x6C65_746E, 0x4965_6E69)  # "GenuineIntel"


def table(vendor=AMD, signature=0x00A0_0F11, ecx=0x7ED8_3203, leaf7_ebx=0x219C_97A9):
    ebx, ecx_vendor, edx = vendor
    return [
        KvmCpuidEntry2(function=0, eax=0x10, ebx=ebx, ecx=ecx_vendor, edx=edx),
        KvmCpuidEntry2(function=1, eax=signature, ecx=ecx, edx=0x078B_FBFF),
        KvmCpuidEntry2(function=7, index=0, ebx=leaf7_ebx),
    ]


def test_the_signature_names_vendor_family_model_and_stepping():
    assert cpu_signature(table()) == {
        "vendor": "AuthenticAMD",
        "signature": 0x00A0_0F11,
        "family": 0x19,
        "model": 0x01,
        "stepping": 1,
    }
    intel = cpu_signature(table(INTEL, signature=0x0005_0654))
    assert (intel["vendor"], intel["family"], intel["model"]) == ("GenuineIntel", 6, 0x55)


def test_a_host_with_every_feature_the_guest_saw_may_restore_it():
    check_cpu_compatible(table(), table())
    check_cpu_compatible(table(ecx=0x0000_0001), table())  # fewer features shown: fine
    check_cpu_compatible(table(signature=0x00A0_0F12), table())  # another stepping


def test_bits_kvmlet_sets_itself_do_not_count():
    hypervisor_and_deadline = 1 << 31 | 1 << 24
    check_cpu_compatible(table(ecx=hypervisor_and_deadline), table(ecx=0))


def test_another_vendor_is_refused():
    with pytest.raises(KvmletError, match="AuthenticAMD CPU and this host has a GenuineIntel"):
        check_cpu_compatible(table(), table(INTEL))


@pytest.mark.parametrize(
    "shown, offered, where",
    [
        (table(ecx=0x1000_0000), table(ecx=0), "0x1.0 ECX bits 0x10000000"),  # AVX
        (table(leaf7_ebx=0x20), table(leaf7_ebx=0), "0x7.0 EBX bits 0x20"),  # AVX2
    ],
)
def test_a_missing_feature_is_refused_naming_it(shown, offered, where):
    with pytest.raises(KvmletError, match=where) as caught:
        check_cpu_compatible(shown, offered)
    assert "\n" not in str(caught.value)


def test_a_cpuid_table_goes_through_bytes_and_back():
    entries = table()
    blob = b"".join(bytes(entry) for entry in entries)
    assert [bytes(entry) for entry in cpuid_entries(blob)] == [bytes(e) for e in entries]
    with pytest.raises(KvmletError, match="CPUID table is damaged"):
        cpuid_entries(blob[:-1])


def test_the_msrs_carried_leave_out_the_hosts_own_and_put_the_tsc_first():
    listing = [0x174, 0x10A, MSR_IA32_TSC_DEADLINE, 0x1DB, 0x4B56_4D01, MSR_IA32_TSC, 0x174]
    assert snapshot_msrs(listing) == [MSR_IA32_TSC, 0x174, MSR_IA32_TSC_DEADLINE, 0x4B56_4D01]
