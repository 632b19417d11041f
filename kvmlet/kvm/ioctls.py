"""KVM ioctl request numbers, derived from structure sizes as <linux/ioctl.h> does.

Every number is computed with `_IO`/`_IOR`/`_IOW`/`_IOWR` from the ctypes structure it carries,
exactly like the kernel header's macros: a structure that drifts from kvm.h changes the
number and the kernel refuses the call, instead of silently reading a wrong layout. The unit
tests compare each number with what gcc computes from the real header.
"""

from __future__ import annotations

import ctypes

from kvmlet.kvm import structs as s

_IOC_NRBITS = 8
_IOC_TYPEBITS = 8
_IOC_SIZEBITS = 14
_IOC_NRSHIFT = 0
_IOC_TYPESHIFT = _IOC_NRSHIFT + _IOC_NRBITS
_IOC_SIZESHIFT = _IOC_TYPESHIFT + _IOC_TYPEBITS
_IOC_DIRSHIFT = _IOC_SIZESHIFT + _IOC_SIZEBITS
_IOC_NONE = 0
_IOC_WRITE = 1
_IOC_READ = 2

KVMIO = 0xAE

# The helpers keep the kernel macros' names so the table below reads like kvm.h.


def _IOC(direction: int, kind: int, number: int, size: int) -> int:
    if size >= 1 << _IOC_SIZEBITS:
        raise ValueError(f"ioctl argument of {size} bytes is too large to encode")
    return (
        (direction << _IOC_DIRSHIFT)
        | (kind << _IOC_TYPESHIFT)
        | (number << _IOC_NRSHIFT)
        | (size << _IOC_SIZESHIFT)
    )


def _IO(kind: int, number: int) -> int:
    return _IOC(_IOC_NONE, kind, number, 0)


def _IOR(kind: int, number: int, ctype: type) -> int:
    return _IOC(_IOC_READ, kind, number, ctypes.sizeof(ctype))


def _IOW(kind: int, number: int, ctype: type) -> int:
    return _IOC(_IOC_WRITE, kind, number, ctypes.sizeof(ctype))


def _IOWR(kind: int, number: int, ctype: type) -> int:
    return _IOC(_IOC_READ | _IOC_WRITE, kind, number, ctypes.sizeof(ctype))


# /dev/kvm (system) ioctls
KVM_GET_API_VERSION = _IO(KVMIO, 0x00)
KVM_CREATE_VM = _IO(KVMIO, 0x01)
KVM_GET_MSR_INDEX_LIST = _IOWR(KVMIO, 0x02, s.KvmMsrList)
KVM_CHECK_EXTENSION = _IO(KVMIO, 0x03)
KVM_GET_VCPU_MMAP_SIZE = _IO(KVMIO, 0x04)
KVM_GET_SUPPORTED_CPUID = _IOWR(KVMIO, 0x05, s.KvmCpuid2)

# VM ioctls
KVM_CREATE_VCPU = _IO(KVMIO, 0x41)
KVM_SET_USER_MEMORY_REGION = _IOW(KVMIO, 0x46, s.KvmUserspaceMemoryRegion)
KVM_SET_TSS_ADDR = _IO(KVMIO, 0x47)
KVM_SET_IDENTITY_MAP_ADDR = _IOW(KVMIO, 0x48, ctypes.c_uint64)
KVM_CREATE_IRQCHIP = _IO(KVMIO, 0x60)
KVM_IRQ_LINE = _IOW(KVMIO, 0x61, s.KvmIrqLevel)
KVM_SET_GSI_ROUTING = _IOW(KVMIO, 0x6A, s.KvmIrqRouting)
KVM_IRQFD = _IOW(KVMIO, 0x76, s.KvmIrqfd)
KVM_CREATE_PIT2 = _IOW(KVMIO, 0x77, s.KvmPitConfig)
KVM_IOEVENTFD = _IOW(KVMIO, 0x79, s.KvmIoeventfd)
KVM_REGISTER_COALESCED_MMIO = _IOW(KVMIO, 0x67, s.KvmCoalescedMmioZone)
KVM_UNREGISTER_COALESCED_MMIO = _IOW(KVMIO, 0x68, s.KvmCoalescedMmioZone)
KVM_SET_CLOCK = _IOW(KVMIO, 0x7B, s.KvmClockData)
KVM_GET_CLOCK = _IOR(KVMIO, 0x7C, s.KvmClockData)
KVM_SIGNAL_MSI = _IOW(KVMIO, 0xA5, s.KvmMsi)
KVM_GET_IRQCHIP = _IOWR(KVMIO, 0x62, s.KvmIrqchip)
KVM_SET_IRQCHIP = _IOR(KVMIO, 0x63, s.KvmIrqchip)  # sic: kvm.h declares it _IOR
KVM_GET_PIT2 = _IOR(KVMIO, 0x9F, s.KvmPitState2)
KVM_SET_PIT2 = _IOW(KVMIO, 0xA0, s.KvmPitState2)

# vCPU ioctls
KVM_RUN = _IO(KVMIO, 0x80)
KVM_GET_REGS = _IOR(KVMIO, 0x81, s.KvmRegs)
KVM_SET_REGS = _IOW(KVMIO, 0x82, s.KvmRegs)
KVM_GET_SREGS = _IOR(KVMIO, 0x83, s.KvmSregs)
KVM_SET_SREGS = _IOW(KVMIO, 0x84, s.KvmSregs)
KVM_GET_MSRS = _IOWR(KVMIO, 0x88, s.KvmMsrs)
KVM_SET_MSRS = _IOW(KVMIO, 0x89, s.KvmMsrs)
KVM_GET_FPU = _IOR(KVMIO, 0x8C, s.KvmFpu)
KVM_SET_FPU = _IOW(KVMIO, 0x8D, s.KvmFpu)
KVM_GET_LAPIC = _IOR(KVMIO, 0x8E, s.KvmLapicState)
KVM_SET_LAPIC = _IOW(KVMIO, 0x8F, s.KvmLapicState)
KVM_SET_CPUID2 = _IOW(KVMIO, 0x90, s.KvmCpuid2)
KVM_GET_CPUID2 = _IOWR(KVMIO, 0x91, s.KvmCpuid2)
KVM_GET_MP_STATE = _IOR(KVMIO, 0x98, s.KvmMpState)
KVM_SET_MP_STATE = _IOW(KVMIO, 0x99, s.KvmMpState)
KVM_GET_VCPU_EVENTS = _IOR(KVMIO, 0x9F, s.KvmVcpuEvents)
KVM_SET_VCPU_EVENTS = _IOW(KVMIO, 0xA0, s.KvmVcpuEvents)
KVM_KVMCLOCK_CTRL = _IO(KVMIO, 0xAD)
KVM_SET_TSC_KHZ = _IO(KVMIO, 0xA2)
KVM_GET_TSC_KHZ = _IO(KVMIO, 0xA3)
KVM_GET_DEBUGREGS = _IOR(KVMIO, 0xA1, s.KvmDebugregs)
KVM_SET_DEBUGREGS = _IOW(KVMIO, 0xA2, s.KvmDebugregs)
KVM_GET_XSAVE = _IOR(KVMIO, 0xA4, s.KvmXsave)
KVM_SET_XSAVE = _IOW(KVMIO, 0xA5, s.KvmXsave)
KVM_GET_XSAVE2 = _IOR(KVMIO, 0xCF, s.KvmXsave)
KVM_GET_XCRS = _IOR(KVMIO, 0xA6, s.KvmXcrs)
KVM_SET_XCRS = _IOW(KVMIO, 0xA7, s.KvmXcrs)

# Capabilities (KVM_CHECK_EXTENSION arguments)
KVM_CAP_IRQCHIP = 0
KVM_CAP_HLT = 1
KVM_CAP_USER_MEMORY = 3
KVM_CAP_SET_TSS_ADDR = 4
KVM_CAP_EXT_CPUID = 7
KVM_CAP_COALESCED_MMIO = 15
KVM_CAP_NR_VCPUS = 9
KVM_CAP_NR_MEMSLOTS = 10
KVM_CAP_IRQ_ROUTING = 25
KVM_CAP_IRQFD = 32
KVM_CAP_PIT2 = 33
KVM_CAP_IOEVENTFD = 36
KVM_CAP_SET_IDENTITY_MAP_ADDR = 37
KVM_CAP_ADJUST_CLOCK = 39
KVM_CAP_INTERNAL_ERROR_DATA = 40
KVM_CAP_VCPU_EVENTS = 41
KVM_CAP_DEBUGREGS = 50
KVM_CAP_XSAVE = 55
KVM_CAP_XCRS = 56
KVM_CAP_TSC_CONTROL = 60
KVM_CAP_GET_TSC_KHZ = 61
KVM_CAP_MAX_VCPUS = 66
KVM_CAP_TSC_DEADLINE_TIMER = 72
KVM_CAP_KVMCLOCK_CTRL = 76
KVM_CAP_SIGNAL_MSI = 77
KVM_CAP_READONLY_MEM = 81
KVM_CAP_IRQFD_RESAMPLE = 82
KVM_CAP_IMMEDIATE_EXIT = 136
KVM_CAP_COALESCED_PIO = 162
KVM_CAP_XSAVE2 = 208

CAPABILITY_NAMES = {
    value: name.removeprefix("KVM_CAP_")
    for name, value in globals().items()
    if name.startswith("KVM_CAP_")
}
"""Capability number -> short name, for error messages."""

# Flags
KVM_MEM_READONLY = 1 << 1
KVM_PIT_SPEAKER_DUMMY = 1
KVM_IOEVENTFD_FLAG_DATAMATCH = 1 << 0
KVM_IOEVENTFD_FLAG_PIO = 1 << 1
KVM_IOEVENTFD_FLAG_DEASSIGN = 1 << 2
KVM_IRQFD_FLAG_DEASSIGN = 1 << 0
KVM_IRQFD_FLAG_RESAMPLE = 1 << 1
KVM_IRQ_ROUTING_IRQCHIP = 1
KVM_IRQ_ROUTING_MSI = 2
KVM_IRQCHIP_PIC_MASTER = 0
KVM_IRQCHIP_PIC_SLAVE = 1
KVM_IRQCHIP_IOAPIC = 2
KVM_CPUID_FLAG_SIGNIFCANT_INDEX = 1 << 0
KVM_MP_STATE_RUNNABLE = 0
KVM_MP_STATE_UNINITIALIZED = 1
KVM_MP_STATE_INIT_RECEIVED = 2
KVM_MP_STATE_HALTED = 3
KVM_MP_STATE_SIPI_RECEIVED = 4
KVM_VCPUEVENT_VALID_NMI_PENDING = 0x1
KVM_VCPUEVENT_VALID_SIPI_VECTOR = 0x2
KVM_VCPUEVENT_VALID_SHADOW = 0x4
KVM_VCPUEVENT_VALID_PAYLOAD = 0x10
KVM_CLOCK_TSC_STABLE = 2

KVM_API_VERSION = 12
KVM_PIO_PAGE_OFFSET = 1
