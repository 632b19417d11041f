"""Pausing a VM: vCPU threads held at a safe point, and the guest's clock frozen meanwhile.

A paused vCPU is one whose thread sits outside KVM_RUN. The machine sets every vCPU's
`immediate_exit` and signals its thread; KVM_RUN then returns EINTR at an instruction boundary,
after completing any port I/O or MMIO the guest had started, and the run loop calls back into
`PauseGate.hold`, which keeps the thread there until the gate opens again (or the machine
stops).

The guest's kvmclock would otherwise jump forward by the length of the pause, so the paused
VM's clock is handled as QEMU does (hw/i386/kvm/clock.c): on pause, KVM_GET_CLOCK saves the
value the guest reads; on resume, KVM_SET_CLOCK puts that value back, so the guest's kvmclock
goes on from where it stopped, and KVM_KVMCLOCK_CTRL on every vCPU tells the guest it was
stopped by its host (its soft-lockup and RCU-stall detectors then keep quiet). A guest whose
clock source is the raw TSC rather than kvmclock still sees the time pass.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable

from kvmlet.errors import KvmletError
from kvmlet.kvm import Vcpu, Vm


class PauseGate:
    """Where vCPU threads wait while the machine is paused.

    `close()` makes every vCPU that reaches its safe point (`hold()`) wait there;
    `wait_parked()` waits until the expected number of vCPUs is held; `open()` lets them go.
    `release()` (the machine stops) opens the gate for good.
    """

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._closed = False
        self._released = False
        self._parked = 0

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def parked(self) -> int:
        """How many vCPU threads are held now."""
        return self._parked

    def close(self) -> None:
        with self._condition:
            if not self._released:
                self._closed = True

    def open(self) -> None:
        with self._condition:
            self._closed = False
            self._condition.notify_all()

    def release(self) -> None:
        """Open the gate and keep it open: the machine is stopping."""
        with self._condition:
            self._released = True
            self._closed = False
            self._condition.notify_all()

    def hold(self) -> None:
        """Called on a vCPU thread at its safe point: wait here while the gate is closed."""
        with self._condition:
            if not self._closed:
                return
            self._parked += 1
            self._condition.notify_all()
            try:
                while self._closed:
                    self._condition.wait()
            finally:
                self._parked -= 1
                self._condition.notify_all()

    def wait_parked(
        self, expected: Callable[[], int], timeout: float, kick: Callable[[], None], interval: float
    ) -> bool:
        """Wait until `expected()` vCPUs are held, calling `kick()` every `interval` seconds
        (a signal can land just before a thread enters KVM_RUN); False after `timeout`."""
        deadline = time.monotonic() + timeout
        with self._condition:
            while self._parked < expected():
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._released:
                    return False
                kick()
                self._condition.wait(min(interval, remaining))
        return True


class FrozenClock:
    """The guest's kvmclock as KVM_GET_CLOCK read it when the VM was paused."""

    __slots__ = ("nanoseconds", "stable")

    def __init__(self, nanoseconds: int, stable: bool):
        self.nanoseconds = nanoseconds
        self.stable = stable

    def __repr__(self) -> str:
        return f"FrozenClock({self.nanoseconds} ns, stable={self.stable})"


def freeze_clock(vm: Vm) -> FrozenClock | None:
    """Read the paused guest's kvmclock; None when this KVM cannot (then nothing is restored)."""
    from kvmlet.kvm.ioctls import KVM_CLOCK_TSC_STABLE

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
