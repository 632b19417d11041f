"""Structure sizes, field offsets and ioctl numbers of kvmlet.kvm against the real kvm.h.

A tiny C program compiled with gcc prints what the kernel headers say; every value must equal
what the ctypes declarations produce.
"""

from __future__ import annotations

import ctypes

import pytest

from kvmlet.kvm import exits
from kvmlet.kvm import ioctls as nr
from kvmlet.kvm import structs as s
from tests.helpers.c_header import probe_c_header

SIZES = {
    "kvm_userspace_memory_region": s.KvmUserspaceMemoryRegion,
    "kvm_irq_level": s.KvmIrqLevel,
    "kvm_pit_config": s.KvmPitConfig,
    "kvm_regs": s.KvmRegs,
    "kvm_segment": s.KvmSegment,
    "kvm_dtable": s.KvmDtable,
    "kvm_sregs": s.KvmSregs,
    "kvm_fpu": s.KvmFpu,
    "kvm_msr_entry": s.KvmMsrEntry,
    "kvm_msrs": s.KvmMsrs,
    "kvm_msr_list": s.KvmMsrList,
    "kvm_cpuid_entry2": s.KvmCpuidEntry2,
    "kvm_cpuid2": s.KvmCpuid2,
    "kvm_irqfd": s.KvmIrqfd,
    "kvm_ioeventfd": s.KvmIoeventfd,
    "kvm_irq_routing_irqchip": s.KvmIrqRoutingIrqchip,
    "kvm_irq_routing_msi": s.KvmIrqRoutingMsi,
    "kvm_irq_routing_entry": s.KvmIrqRoutingEntry,
    "kvm_irq_routing": s.KvmIrqRouting,
    "kvm_msi": s.KvmMsi,
    "kvm_vcpu_events": s.KvmVcpuEvents,
    "kvm_lapic_state": s.KvmLapicState,
    "kvm_clock_data": s.KvmClockData,
    "kvm_run": s.KvmRun,
}

OFFSETS = {
    "kvm_run.immediate_exit": s.KvmRun.immediate_exit.offset,
    "kvm_run.exit_reason": s.KvmRun.exit_reason.offset,
    "kvm_run.io": s.KvmRun.exit.offset,
    "kvm_run.io.data_offset": s.KvmRun.exit.offset + s.RunIo.data_offset.offset,
    "kvm_run.mmio.data": exits.MMIO_DATA_OFFSET,
    "kvm_run.mmio.len": s.KvmRun.exit.offset + s.RunMmio.len.offset,
    "kvm_run.mmio.is_write": s.KvmRun.exit.offset + s.RunMmio.is_write.offset,
    "kvm_run.internal.data": s.KvmRun.exit.offset + s.RunInternal.data.offset,
    "kvm_run.system_event.data": s.KvmRun.exit.offset + s.RunSystemEvent.data.offset,
    "kvm_run.fail_entry.cpu": s.KvmRun.exit.offset + s.RunFailEntry.cpu.offset,
    "kvm_run.kvm_valid_regs": s.KvmRun.kvm_valid_regs.offset,
    "kvm_sregs.efer": s.KvmSregs.efer.offset,
    "kvm_sregs.apic_base": s.KvmSregs.apic_base.offset,
    "kvm_fpu.mxcsr": s.KvmFpu.mxcsr.offset,
    "kvm_vcpu_events.flags": s.KvmVcpuEvents.flags.offset,
    "kvm_vcpu_events.exception_payload": s.KvmVcpuEvents.exception_payload.offset,
    "kvm_irq_routing_entry.u": s.KvmIrqRoutingEntry.u.offset,
}

IOCTLS = [name for name in dir(nr) if name.startswith("KVM_") and name.isupper()]
IOCTLS = [
    name
    for name in IOCTLS
    if not name.startswith(("KVM_CAP_", "KVM_MEM_", "KVM_IRQ_ROUTING_", "KVM_IRQCHIP_"))
    and not name.startswith(("KVM_IOEVENTFD_FLAG", "KVM_IRQFD_FLAG", "KVM_VCPUEVENT_"))
    and not name.startswith("KVM_CLOCK_")
    and name
    not in (
        "KVM_API_VERSION",
        "KVM_PIO_PAGE_OFFSET",
        "KVM_PIT_SPEAKER_DUMMY",
        "KVM_CPUID_FLAG_SIGNIFCANT_INDEX",
    )
]
CONSTANTS = [
    name
    for name in dir(nr)
    if name.startswith(("KVM_CAP_", "KVM_MEM_READONLY", "KVM_IRQ_ROUTING_", "KVM_IRQCHIP_"))
    or name.startswith(("KVM_IOEVENTFD_FLAG_", "KVM_IRQFD_FLAG_", "KVM_VCPUEVENT_VALID_"))
    or name.startswith("KVM_CLOCK_")
    or name in ("KVM_API_VERSION", "KVM_PIO_PAGE_OFFSET", "KVM_PIT_SPEAKER_DUMMY")
]
EXIT_CONSTANTS = [name for name in dir(exits) if name.startswith("KVM_")]


@pytest.fixture(scope="module")
def header_values(tmp_path_factory) -> dict[str, int]:
    directory = tmp_path_factory.mktemp("kvmh")
    return probe_c_header(
        directory, "linux/kvm.h", SIZES, OFFSETS, (*IOCTLS, *CONSTANTS, *EXIT_CONSTANTS)
    )


@pytest.mark.parametrize("name", SIZES)
def test_structure_size_matches_kvm_h(header_values, name):
    assert ctypes.sizeof(SIZES[name]) == header_values[f"sizeof {name}"]


@pytest.mark.parametrize("name", OFFSETS)
def test_field_offset_matches_kvm_h(header_values, name):
    assert OFFSETS[name] == header_values[f"offset {name}"]


@pytest.mark.parametrize("name", IOCTLS)
def test_ioctl_number_matches_kvm_h(header_values, name):
    assert getattr(nr, name) == header_values[f"value {name}"], f"{name} = {getattr(nr, name):#x}"


@pytest.mark.parametrize("name", CONSTANTS + EXIT_CONSTANTS)
def test_constant_matches_kvm_h(header_values, name):
    module = exits if name in EXIT_CONSTANTS else nr
    assert getattr(module, name) == header_values[f"value {name}"]


def test_flexible_array_variants_carry_entries():
    assert ctypes.sizeof(s.msrs_with(3)) == ctypes.sizeof(s.KvmMsrs) + 3 * 16
    assert ctypes.sizeof(s.cpuid2_with(2)) == 8 + 2 * 40
    assert ctypes.sizeof(s.irq_routing_with(4)) == 8 + 4 * 48
    assert s.msrs_with(3) is s.msrs_with(3)


def test_ioc_refuses_an_argument_too_large_to_encode():
    with pytest.raises(ValueError):
        nr._IOC(nr._IOC_READ, nr.KVMIO, 1, 1 << 14)
