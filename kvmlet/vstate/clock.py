"""The guest's kvmclock across a pause: frozen when the VM stops, put back when it runs again.

Left alone, a paused guest's kvmclock would jump forward by the length of the pause once it
runs again. kvmlet does what QEMU does (hw/i386/kvm/clock.c, `kvmclock_vm_state_change`): when
the vCPUs are held, KVM_GET_CLOCK reads the value the guest sees; before they run again,
KVM_SET_CLOCK puts that value back, so the guest's kvmclock goes on from where it stopped, and
KVM_KVMCLOCK_CTRL on every vCPU tells the guest it was stopped by its host (its soft-lockup and
RCU-stall detectors then keep quiet). A guest whose clock source is the raw TSC rather than
kvmclock still sees the time pass.
"""

from __future__ import annotations

from collections.abc import Iterable

from kvmlet.errors import KvmletError
from kvmlet.kvm import Vcpu, Vm
from kvmlet.kvm.ioctls import KVM_CLOCK_TSC_STABLE


class FrozenClock:
    """The guest's kvmclock as KVM_GET_CLOCK read it when the VM was paused."""

    __slots__ = ("nanoseconds", "stable")

    def __init__(self, nanoseconds: int, stable: bool):
        self.nanoseconds = nanoseconds
        self.stable = stable  # the same value on every vCPU (KVM_CLOCK_TSC_STABLE)

    def __repr__(self) -> str:
        return f"FrozenClock({self.nanoseconds} ns, stable={self.stable})"


def freeze_clock(vm: Vm) -> FrozenClock | None:
    """Read the paused guest's kvmclock; None when this KVM cannot (then nothing is restored)."""
    try:
        data = vm.get_clock()
    except KvmletError:
        return None
    return FrozenClock(data.clock, bool(data.flags & KVM_CLOCK_TSC_STABLE))


def thaw_clock(vm: Vm, vcpus: Iterable[Vcpu], frozen: FrozenClock | None) -> int:
    """Before the vCPUs run again: the guest's kvmclock back to its paused value, and every
    vCPU told it was stopped by its host. Returns how many vCPUs had a kvmclock to tell."""
    if frozen is None:
        return 0
    vm.set_clock(frozen.nanoseconds)
    return sum(vcpu.kvmclock_ctrl() for vcpu in vcpus)
