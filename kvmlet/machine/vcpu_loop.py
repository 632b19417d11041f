"""The vCPU run loop: the one place in kvmlet that knows about KVM exits.

Each vCPU runs `run_vcpu` on a thread of its own (KVM_RUN releases the GIL). Port I/O and MMIO
exits go straight to the bus's `read`/`write`; everything else ends the loop with a
`GuestStop` saying how the guest stopped. With a bus `Reader`, the loop makes its sequence odd
while it handles an exit and even while the guest runs: the quiescent points a region removal
waits for (`kvmlet.bus.topology`). The loop is deliberately flat: on our machines an exit
costs ~7.6 µs and every attribute lookup inside it shows in the exit-cost benchmark.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import NamedTuple

from kvmlet.bus import AddressSpace
from kvmlet.bus.topology import Reader
from kvmlet.kvm import (
    FailEntryExit,
    HltExit,
    InternalErrorExit,
    InterruptedExit,
    IoExit,
    MmioExit,
    ShutdownExit,
    SystemEventExit,
    Vcpu,
)
from kvmlet.kvm.exits import (
    KVM_SYSTEM_EVENT_CRASH,
    KVM_SYSTEM_EVENT_RESET,
    KVM_SYSTEM_EVENT_SHUTDOWN,
)


class StopReason(enum.Enum):
    """How a guest (or the user) ended a run; `exit_status` is what `kvmlet run` returns."""

    RESET = ("the guest reset the machine", 0)
    POWER_OFF = ("the guest powered off", 0)
    HOST_QUIT = ("stopped from the host", 0)
    INIT_EXITED = ("the guest's command finished", 0)
    TRIPLE_FAULT = ("the guest triple-faulted (KVM shutdown)", 3)
    EMULATION_FAILURE = ("KVM could not emulate a guest instruction", 4)
    ENTRY_FAILURE = ("KVM could not enter the guest", 4)
    GUEST_CRASH = ("the guest crashed", 5)
    USER_SPACE_UNSUPPORTED = ("the guest reached user space, which this host cannot run", 6)
    UNEXPECTED_SYSTEM_EVENT = ("KVM stopped the guest with a system event kvmlet does not know", 7)
    TIMEOUT = ("the run timed out", 124)
    MONITOR_ERROR = ("kvmlet failed", 70)

    def __init__(self, description: str, exit_status: int):
        self.description = description
        self.exit_status = exit_status


class GuestStop(NamedTuple):
    """Why a run ended, with detail for the user (registers and bytes of a failure)."""

    reason: StopReason
    detail: str = ""
    vcpu: int | None = None

    def __str__(self) -> str:
        text = self.reason.description
        return f"{text}: {self.detail}" if self.detail else text


EmulationFixup = Callable[[Vcpu, InternalErrorExit], bool]
"""A host-profile hook: True when it repaired an emulation failure and the vCPU may go on."""


def run_vcpu(
    vcpu: Vcpu,
    io: AddressSpace,
    mmio: AddressSpace,
    should_stop: Callable[[], bool],
    fix_emulation: EmulationFixup | None = None,
    describe_failure: Callable[[Vcpu], str] = lambda vcpu: "",
    reader: Reader | None = None,
) -> GuestStop | None:
    """Run `vcpu` until the guest stops it (a `GuestStop`) or `should_stop()` (None)."""
    run = vcpu.run
    io_read, io_write = io.read, io.write
    mmio_read, mmio_write = mmio.read, mmio.write
    from_bytes = int.from_bytes
    side = reader if reader is not None else Reader()
    while True:
        exit_ = run()
        side.sequence += 1  # dispatching: this thread may hold a view until it is even again
        try:
            kind = type(exit_)
            if kind is IoExit:
                size, data, port = exit_.size, exit_.data, exit_.port
                if exit_.count == 1:
                    if exit_.is_write:
                        io_write(port, size, data[0] if size == 1 else from_bytes(data, "little"))
                    elif size == 1:
                        data[0] = io_read(port, 1)
                    else:
                        data[:] = io_read(port, size).to_bytes(size, "little")
                else:
                    _string_io(io, exit_)
            elif kind is MmioExit:
                size, data, address = exit_.size, exit_.data, exit_.address
                if exit_.is_write:
                    mmio_write(address, size, from_bytes(data, "little"))
                else:
                    data[:] = mmio_read(address, size).to_bytes(size, "little")
            elif kind is InterruptedExit:
                if should_stop():
                    return None
            else:
                stop = _rare_exit(vcpu, exit_, fix_emulation, describe_failure)
                if stop is not None:
                    return stop
        finally:
            side.sequence += 1


def _string_io(io: AddressSpace, exit_: IoExit) -> None:
    """INS/OUTS with a REP prefix: `count` accesses of `size` bytes through the run page."""
    size, data, port = exit_.size, exit_.data, exit_.port
    for index in range(0, size * exit_.count, size):
        if exit_.is_write:
            io.write(port, size, int.from_bytes(data[index : index + size], "little"))
        else:
            data[index : index + size] = io.read(port, size).to_bytes(size, "little")


def _rare_exit(
    vcpu: Vcpu,
    exit_: object,
    fix_emulation: EmulationFixup | None,
    describe_failure: Callable[[Vcpu], str],
) -> GuestStop | None:
    if isinstance(exit_, HltExit):
        return GuestStop(StopReason.POWER_OFF, "the vCPU halted", vcpu.id)
    if isinstance(exit_, ShutdownExit):
        return GuestStop(StopReason.TRIPLE_FAULT, describe_failure(vcpu), vcpu.id)
    if isinstance(exit_, SystemEventExit):
        if exit_.kind == KVM_SYSTEM_EVENT_RESET:
            return GuestStop(StopReason.RESET, "", vcpu.id)
        if exit_.kind == KVM_SYSTEM_EVENT_CRASH:
            return GuestStop(StopReason.GUEST_CRASH, "", vcpu.id)
        if exit_.kind == KVM_SYSTEM_EVENT_SHUTDOWN:
            return GuestStop(StopReason.POWER_OFF, "", vcpu.id)
        data = ", ".join(f"{word:#x}" for word in exit_.data)
        detail = f"type {exit_.kind}" + (f", data {data}" if data else "")
        return GuestStop(StopReason.UNEXPECTED_SYSTEM_EVENT, detail, vcpu.id)
    if isinstance(exit_, InternalErrorExit):
        if fix_emulation is not None and fix_emulation(vcpu, exit_):
            return None
        return GuestStop(StopReason.EMULATION_FAILURE, describe_failure(vcpu), vcpu.id)
    if isinstance(exit_, FailEntryExit):
        detail = f"hardware entry failure reason {exit_.reason:#x}"
        return GuestStop(StopReason.ENTRY_FAILURE, detail, vcpu.id)
    return GuestStop(StopReason.MONITOR_ERROR, f"unexpected exit {exit_!r}", vcpu.id)
