"""`Kvm`: the /dev/kvm system handle (API version, capabilities, supported CPUID, MSR list).

Opening /dev/kvm is the first thing a user's mistake shows up in (no such device, no
permission, a wrong API version, a missing capability): each becomes one `KvmletError` line.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterable

from kvmlet.errors import KvmletError
from kvmlet.kvm import ioctls as nr
from kvmlet.kvm import structs as s
from kvmlet.kvm._syscall import failure, ioctl_int, ioctl_struct
from kvmlet.kvm.vm import Vm

REQUIRED_CAPABILITIES = (
    nr.KVM_CAP_IRQCHIP,
    nr.KVM_CAP_USER_MEMORY,
    nr.KVM_CAP_SET_TSS_ADDR,
    nr.KVM_CAP_SET_IDENTITY_MAP_ADDR,
    nr.KVM_CAP_EXT_CPUID,
    nr.KVM_CAP_PIT2,
    nr.KVM_CAP_IRQFD,
    nr.KVM_CAP_IOEVENTFD,
    nr.KVM_CAP_IRQ_ROUTING,
    nr.KVM_CAP_SIGNAL_MSI,
    nr.KVM_CAP_VCPU_EVENTS,
    nr.KVM_CAP_IMMEDIATE_EXIT,
)
"""What a kvmlet machine uses: checked once when it opens /dev/kvm."""

_MAX_CPUID_ENTRIES = 256


def _open_error(path: str, error: OSError) -> KvmletError:
    if error.errno == errno.ENOENT:
        return KvmletError(
            f"cannot open {path}: no such device (is KVM enabled? try `modprobe kvm_intel` "
            "or `modprobe kvm_amd`)"
        )
    if error.errno in (errno.EACCES, errno.EPERM):
        return KvmletError(f"cannot open {path}: permission denied (add yourself to the kvm group)")
    return KvmletError(f"cannot open {path}: {os.strerror(error.errno or 0).lower()}")


class Kvm:
    """An open /dev/kvm with its API version checked."""

    def __init__(self, path: str = "/dev/kvm"):
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as error:
            raise _open_error(path, error) from None
        self.path = path
        try:
            version = ioctl_int(self.fd, nr.KVM_GET_API_VERSION)
        except OSError as error:
            self.close()
            raise KvmletError(f"{path} is not a KVM device: {error.strerror}") from None
        if version != nr.KVM_API_VERSION:
            self.close()
            raise KvmletError(
                f"{path} speaks KVM API version {version}; kvmlet needs {nr.KVM_API_VERSION}"
            )

    def check_extension(self, capability: int) -> int:
        """KVM_CHECK_EXTENSION: 0 when unsupported, else a positive, capability-specific value."""
        return ioctl_int(self.fd, nr.KVM_CHECK_EXTENSION, capability)

    def require(self, capabilities: Iterable[int] = REQUIRED_CAPABILITIES) -> None:
        """Raise one KvmletError naming the first capability this KVM lacks."""
        for capability in capabilities:
            if self.check_extension(capability) <= 0:
                name = nr.CAPABILITY_NAMES.get(capability, str(capability))
                raise KvmletError(f"this KVM lacks a capability kvmlet needs: KVM_CAP_{name}")

    def vcpu_mmap_size(self) -> int:
        """Bytes to mmap from a vCPU fd (the kvm_run page plus the PIO/coalesced pages)."""
        return ioctl_int(self.fd, nr.KVM_GET_VCPU_MMAP_SIZE)

    def supported_cpuid(self) -> list[s.KvmCpuidEntry2]:
        """KVM_GET_SUPPORTED_CPUID: every CPUID entry this KVM can give a guest (copies)."""
        cpuid = s.cpuid2_with(_MAX_CPUID_ENTRIES)()
        cpuid.header.nent = _MAX_CPUID_ENTRIES
        try:
            ioctl_struct(self.fd, nr.KVM_GET_SUPPORTED_CPUID, cpuid)
        except OSError as error:
            raise failure("KVM_GET_SUPPORTED_CPUID", error) from None
        return [_copy(entry) for entry in cpuid.entries[: cpuid.header.nent]]

    def msr_index_list(self) -> list[int]:
        """KVM_GET_MSR_INDEX_LIST: the MSRs a vCPU's state save/restore covers."""
        probe = s.KvmMsrList(0)
        try:
            ioctl_struct(self.fd, nr.KVM_GET_MSR_INDEX_LIST, probe)
        except OSError as error:
            if error.errno != errno.E2BIG:
                raise failure("KVM_GET_MSR_INDEX_LIST", error) from None
        listing = s.msr_list_with(probe.nmsrs)()
        listing.header.nmsrs = probe.nmsrs
        try:
            ioctl_struct(self.fd, nr.KVM_GET_MSR_INDEX_LIST, listing)
        except OSError as error:
            raise failure("KVM_GET_MSR_INDEX_LIST", error) from None
        return list(listing.entries[: listing.header.nmsrs])

    def create_vm(self) -> Vm:
        """A new, empty VM on this KVM."""
        return Vm(self)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Kvm:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _copy(entry: s.KvmCpuidEntry2) -> s.KvmCpuidEntry2:
    return s.KvmCpuidEntry2.from_buffer_copy(entry)
