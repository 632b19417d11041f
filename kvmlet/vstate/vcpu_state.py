"""A vCPU's whole KVM state, read for a snapshot and written back into a fresh vCPU.

What is saved, and in which order (each step is what QEMU's and Firecracker's x86 state
save does; the order matters to KVM):

- read: MP state first (KVM_GET_MP_STATE makes the local APIC accept pending INIT/SIPI
  events, which may change the rest), then the CPUID table the vCPU was given (as kvmlet set
  it: on some KVMs KVM_GET_CPUID2 reports another), registers, special registers, the XSAVE
  area (the FPU registers when the KVM has no XSAVE), XCRs, debug registers, the local APIC,
  the MSRs, the pending events and the TSC frequency;
- write: CPUID, the TSC frequency (before the TSC itself), special registers (EFER before
  MSRs that depend on it), registers, XSAVE, XCRs, the MSRs (the TSC first), MP state, the
  local APIC, then the TSC deadline (KVM ignores it unless the APIC timer is in TSC-deadline
  mode, so after the APIC), the events (with the NMI-pending and SIPI-vector fields, which
  KVM only takes when told) and the debug registers.

MSRs: `snapshot_msrs` keeps what KVM_GET_MSR_INDEX_LIST reports, less what QEMU does not
migrate either: feature MSRs, whose values the host (or the CPU model) decides, not the guest
(`FEATURE_MSRS`), and the read-only last-branch records. An MSR the vCPU cannot read is left
out. The TSC is written as a host-initiated MSR write, which KVM treats as a synchronisation:
the vCPUs' TSCs written within a second of each other share one offset, so they stay in step,
and the guest's TSC goes on from the value it had (the time the machine spent saved does not
show, as after a pause: the guest's kvmclock is put back the same way, vstate/clock.py).
"""

from __future__ import annotations

import ctypes
import struct
from collections.abc import Iterable, Sequence
from typing import NamedTuple

from kvmlet.errors import KvmletError
from kvmlet.kvm import Kvm, Vcpu
from kvmlet.kvm import ioctls as nr
from kvmlet.kvm import structs as s

MSR_IA32_TSC = 0x10
MSR_IA32_TSC_DEADLINE = 0x6E0
FEATURE_MSRS = frozenset(
    {
        0x8B,  # IA32_UCODE_REV
        0xCE,  # PLATFORM_INFO
        0x10A,  # IA32_ARCH_CAPABILITIES
        0x345,  # IA32_PERF_CAPABILITIES
        0xC001_011F,  # AMD DE_CFG
    }
)
"""MSRs that describe the host CPU (what KVM_GET_MSR_FEATURE_INDEX_LIST covers): set by the
monitor from the CPU model in QEMU, never migrated as guest state."""
LAST_BRANCH_RECORDS = frozenset(range(0x1DB, 0x1DF))
"""LASTBRANCHFROMIP, LASTBRANCHTOIP, LASTINTFROMIP, LASTINTTOIP: read-only history."""
EVENTS_TO_WRITE = nr.KVM_VCPUEVENT_VALID_NMI_PENDING | nr.KVM_VCPUEVENT_VALID_SIPI_VECTOR
_CPUID_ENTRY = ctypes.sizeof(s.KvmCpuidEntry2)


class VcpuCapabilities(NamedTuple):
    """Which optional parts of a vCPU's state this KVM saves, and the MSRs it covers."""

    xsave_size: int  # 0: no XSAVE (the FPU registers instead)
    xcrs: bool
    debugregs: bool
    tsc_khz: bool
    tsc_control: bool  # KVM_SET_TSC_KHZ can set another frequency than the host's
    msrs: tuple[int, ...]


def vcpu_capabilities(kvm: Kvm) -> VcpuCapabilities:
    """What `save_vcpu` and `restore_vcpu` use on this KVM."""
    xsave = kvm.check_extension(nr.KVM_CAP_XSAVE) > 0
    xsave2 = kvm.check_extension(nr.KVM_CAP_XSAVE2)
    return VcpuCapabilities(
        xsave_size=max(xsave2, ctypes.sizeof(s.KvmXsave)) if xsave else 0,
        xcrs=kvm.check_extension(nr.KVM_CAP_XCRS) > 0,
        debugregs=kvm.check_extension(nr.KVM_CAP_DEBUGREGS) > 0,
        tsc_khz=kvm.check_extension(nr.KVM_CAP_GET_TSC_KHZ) > 0,
        tsc_control=kvm.check_extension(nr.KVM_CAP_TSC_CONTROL) > 0,
        msrs=tuple(snapshot_msrs(kvm.msr_index_list())),
    )


def snapshot_msrs(listing: Iterable[int]) -> list[int]:
    """The MSRs of KVM_GET_MSR_INDEX_LIST a snapshot carries, in the order they are written
    back: the TSC first, then the others as KVM lists them (the TSC deadline is kept apart:
    it goes after the local APIC)."""
    wanted = [
        index
        for index in dict.fromkeys(listing)
        if index not in FEATURE_MSRS and index not in LAST_BRANCH_RECORDS
    ]
    wanted.sort(key=lambda index: index != MSR_IA32_TSC)
    return wanted


def read_msrs(vcpu: Vcpu, indices: Sequence[int]) -> dict[int, int]:
    """Every MSR of `indices` the vCPU can read (KVM stops at the first it cannot: that one
    is left out and the rest read again)."""
    values: dict[int, int] = {}
    remaining = list(indices)
    while remaining:
        got = vcpu.get_msrs(remaining)
        values.update(got)
        remaining = remaining[len(got) + 1 :]
    return values


def save_vcpu(vcpu: Vcpu, capabilities: VcpuCapabilities) -> dict[str, object]:
    """The state of a vCPU held outside KVM_RUN (paused: no I/O half done)."""
    mp_state = vcpu.get_mp_state()
    cpuid = vcpu.cpuid if vcpu.cpuid is not None else vcpu.get_cpuid2()
    msrs = read_msrs(vcpu, capabilities.msrs)
    deadline = msrs.pop(MSR_IA32_TSC_DEADLINE, None)
    state: dict[str, object] = {
        "id": vcpu.id,
        "mp_state": mp_state,
        "cpuid": b"".join(bytes(entry) for entry in cpuid),
        "regs": bytes(vcpu.get_regs()),
        "sregs": bytes(vcpu.get_sregs()),
        "xsave": vcpu.get_xsave(capabilities.xsave_size) if capabilities.xsave_size else None,
        "fpu": None if capabilities.xsave_size else bytes(vcpu.get_fpu()),
        "xcrs": bytes(vcpu.get_xcrs()) if capabilities.xcrs else None,
        "debugregs": bytes(vcpu.get_debugregs()) if capabilities.debugregs else None,
        "lapic": bytes(vcpu.get_lapic()),
        "msrs": [[index, value] for index, value in msrs.items()],
        "tsc_deadline": deadline,
        "events": bytes(vcpu.get_vcpu_events()),
        "tsc_khz": vcpu.get_tsc_khz() if capabilities.tsc_khz else None,
    }
    return state


def cpuid_entries(blob: bytes) -> list[s.KvmCpuidEntry2]:
    """The CPUID table of a saved vCPU."""
    if len(blob) % _CPUID_ENTRY:
        raise KvmletError("the snapshot's CPUID table is damaged")
    return [
        s.KvmCpuidEntry2.from_buffer_copy(blob, offset)
        for offset in range(0, len(blob), _CPUID_ENTRY)
    ]


def _structure(kind: type, blob: object, what: str):
    if not isinstance(blob, bytes) or len(blob) != ctypes.sizeof(kind):
        raise KvmletError(f"the snapshot's {what} of a vCPU is damaged")
    return kind.from_buffer_copy(blob)


def restore_vcpu(vcpu: Vcpu, state: dict, capabilities: VcpuCapabilities) -> None:
    """Write a saved state into a fresh vCPU of the same number (see the module docstring
    for the order). KvmletError, one line, for what this KVM refuses."""
    vcpu.set_cpuid2(cpuid_entries(state["cpuid"]))
    khz = state["tsc_khz"]
    if khz is not None and capabilities.tsc_khz and vcpu.get_tsc_khz() != khz:
        if not capabilities.tsc_control:
            raise KvmletError(
                f"the snapshot's guest TSC runs at {khz} kHz and this host's at "
                f"{vcpu.get_tsc_khz()} kHz, without TSC scaling to make up for it"
            )
        vcpu.set_tsc_khz(khz)
    vcpu.set_sregs(_structure(s.KvmSregs, state["sregs"], "special registers"))
    vcpu.set_regs(_structure(s.KvmRegs, state["regs"], "registers"))
    if state["xsave"] is not None:
        if not capabilities.xsave_size or len(state["xsave"]) > capabilities.xsave_size:
            raise KvmletError("the snapshot's XSAVE area is larger than this KVM's")
        vcpu.set_xsave(state["xsave"])
    else:
        vcpu.set_fpu(_structure(s.KvmFpu, state["fpu"], "FPU registers"))
    if state["xcrs"] is not None and capabilities.xcrs:
        vcpu.set_xcrs(_structure(s.KvmXcrs, state["xcrs"], "XCRs"))
    msrs = {int(index): int(value) for index, value in state["msrs"]}
    if msrs:
        vcpu.set_msrs(msrs)
    vcpu.set_mp_state(int(state["mp_state"]))
    vcpu.set_lapic(_structure(s.KvmLapicState, state["lapic"], "local APIC"))
    if state["tsc_deadline"] is not None:
        vcpu.set_msrs({MSR_IA32_TSC_DEADLINE: int(state["tsc_deadline"])})
    events = _structure(s.KvmVcpuEvents, state["events"], "pending events")
    events.flags |= EVENTS_TO_WRITE
    vcpu.set_vcpu_events(events)
    if state["debugregs"] is not None and capabilities.debugregs:
        vcpu.set_debugregs(_structure(s.KvmDebugregs, state["debugregs"], "debug registers"))


# -- the host CPU ---------------------------------------------------------------------------

CPUID_VENDOR = 0x0
CPUID_SIGNATURE = 0x1
CPUID_STRUCTURED_FEATURES = 0x7
CPUID_XSAVE = 0xD
CPUID_EXTENDED_FEATURES = 0x8000_0001
CPUID_KVM_FEATURES = 0x4000_0001
FEATURE_REGISTERS = {
    (CPUID_SIGNATURE, 0): ("ecx", "edx"),
    (CPUID_STRUCTURED_FEATURES, 0): ("ebx", "ecx", "edx"),
    (CPUID_STRUCTURED_FEATURES, 1): ("eax",),
    (CPUID_XSAVE, 0): ("eax", "edx"),
    (CPUID_XSAVE, 1): ("eax",),
    (CPUID_EXTENDED_FEATURES, 0): ("ecx", "edx"),
    (CPUID_KVM_FEATURES, 0): ("eax",),
}
"""CPUID registers whose bits are features a guest may use once it has seen them."""
MONITOR_SET_BITS = {
    (CPUID_SIGNATURE, 0, "ecx"): 1 << 31 | 1 << 24,  # hypervisor; TSC deadline (vstate/cpu.py)
    (CPUID_SIGNATURE, 0, "edx"): 1 << 28,  # HTT with more than one vCPU
}
"""Bits kvmlet sets itself, whatever KVM_GET_SUPPORTED_CPUID says."""


def _leaf(entries: Iterable[s.KvmCpuidEntry2], function: int, index: int = 0):
    for entry in entries:
        if entry.function == function and entry.index == index:
            return entry
    return None


def cpu_signature(cpuid: Sequence[s.KvmCpuidEntry2]) -> dict[str, object]:
    """The CPU a CPUID table describes: vendor, signature (leaf 1 EAX) and its family, model
    and stepping as the SDM composes them."""
    vendor = _leaf(cpuid, CPUID_VENDOR)
    leaf1 = _leaf(cpuid, CPUID_SIGNATURE)
    name = struct.pack("<III", vendor.ebx, vendor.edx, vendor.ecx) if vendor else b""
    eax = leaf1.eax if leaf1 else 0
    family = eax >> 8 & 0xF
    model = eax >> 4 & 0xF
    if family == 0xF:
        family += eax >> 20 & 0xFF
    if family >= 6:
        model |= (eax >> 16 & 0xF) << 4
    return {
        "vendor": name.decode("ascii", "replace").rstrip("\0"),
        "signature": eax,
        "family": family,
        "model": model,
        "stepping": eax & 0xF,
    }


def check_cpu_compatible(
    saved: Sequence[s.KvmCpuidEntry2], supported: Sequence[s.KvmCpuidEntry2]
) -> None:
    """KvmletError (one line) unless this host can run a guest that saw the CPUID `saved`:
    the same vendor, and every feature the guest was shown supported here."""
    had, has = cpu_signature(saved), cpu_signature(supported)
    if had["vendor"] != has["vendor"]:
        raise KvmletError(
            f"the snapshot was taken on a {had['vendor']} CPU and this host has a "
            f"{has['vendor']} one: it cannot be restored here"
        )
    for (function, index), registers in FEATURE_REGISTERS.items():
        shown = _leaf(saved, function, index)
        if shown is None:
            continue
        offered = _leaf(supported, function, index)
        for register in registers:
            allowed = MONITOR_SET_BITS.get((function, index, register), 0)
            available = getattr(offered, register) if offered is not None else 0
            missing = getattr(shown, register) & ~(available | allowed)
            if missing:
                raise KvmletError(
                    f"this host's CPU lacks features the snapshot's guest uses (CPUID "
                    f"{function:#x}.{index} {register.upper()} bits {missing:#x}): "
                    f"snapshot from family {had['family']:#x} model {had['model']:#x}, "
                    f"this host family {has['family']:#x} model {has['model']:#x}"
                )
