"""The vCPU run loop: the one place in kvmlet that knows about KVM exits.

Each vCPU runs `run_vcpu` on a thread of its own (KVM_RUN releases the GIL). Port I/O and MMIO
exits go straight to the bus's `read`/`write`; everything else ends the loop with a
`GuestStop` saying how the guest stopped. With a bus `Reader`, the loop makes its sequence odd
while it handles an exit and even while the guest runs: the quiescent points a region removal
waits for (`kvmlet.bus.transactions`). The loop is deliberately flat: every attribute lookup
inside it shows in the exit-cost benchmark (benchmarks/exit_cost.py).

The loop counts its exits by reason in variables of its own frame that a reader function
closes over (cell variables: as cheap to increment as locals, and readable from any thread),
published through an `ExitCounts`; docs/performance.md has what the counting costs.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import NamedTuple

from kvmlet.bus import AddressSpace
from kvmlet.bus.transactions import Reader
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
    WATCH_FAILED = ("a watchpoint's check failed", 7)
    UNEXPECTED_SYSTEM_EVENT = ("KVM stopped the guest with a system event kvmlet does not know", 8)
    DEBUG_EXIT = ("the guest wrote to the debug-exit port", 1)  # the status is the guest's
    TIMEOUT = ("the run timed out", 124)
    MONITOR_ERROR = ("kvmlet failed", 70)

    def __init__(self, description: str, exit_status: int):
        self.description = description
        self.exit_status = exit_status


class GuestStop(NamedTuple):
    """Why a run ended, with detail for the user (registers and bytes of a failure);
    `status` is an exit status the guest chose (the debug-exit port), else None."""

    reason: StopReason
    detail: str = ""
    vcpu: int | None = None
    status: int | None = None

    @property
    def exit_status(self) -> int:
        """What `kvmlet run` exits with."""
        return self.reason.exit_status if self.status is None else self.status

    def __str__(self) -> str:
        text = self.reason.description
        return f"{text}: {self.detail}" if self.detail else text


EmulationFixup = Callable[[Vcpu, InternalErrorExit], bool]
"""A host-profile hook: True when it repaired an emulation failure and the vCPU may go on."""

RARE_EXIT_NAMES = {
    HltExit: "hlt",
    ShutdownExit: "shutdown",
    SystemEventExit: "system_event",
    InternalErrorExit: "internal_error",
    FailEntryExit: "fail_entry",
}
"""The name under which `ExitCounts` reports each rare exit (anything else is "other")."""
EXIT_REASONS = ("io", "mmio", "intr", *RARE_EXIT_NAMES.values(), "other")
"""Every key of `ExitCounts.snapshot()`, in KVM's terms: `intr` is a KVM_RUN interrupted by a
signal or `immediate_exit` (a pause, a stop or a kick)."""


class ExitCounts:
    """One vCPU's exits by reason (`EXIT_REASONS`), kept by `run_vcpu`, read from any thread."""

    def __init__(self) -> None:
        self._read: Callable[[], dict[str, int]] = lambda: dict.fromkeys(EXIT_REASONS, 0)

    def snapshot(self) -> dict[str, int]:
        """The counts so far (all zero before the vCPU first ran)."""
        return self._read()


def run_vcpu(
    vcpu: Vcpu,
    io: AddressSpace,
    mmio: AddressSpace,
    should_stop: Callable[[], bool],
    fix_emulation: EmulationFixup | None = None,
    describe_failure: Callable[[Vcpu], str] = lambda vcpu: "",
    counts: ExitCounts | None = None,
    reader: Reader | None = None,
) -> GuestStop | None:
    """Run `vcpu` until the guest stops it (a `GuestStop`) or `should_stop()` (None).

    `should_stop()` is called whenever KVM_RUN was interrupted (a signal or `immediate_exit`):
    the vCPU is then outside the guest at an instruction boundary, with any port I/O or MMIO
    completed, so the callback may also hold the thread there (a pause) before answering.
    `counts`, when given, is kept up to date with this vCPU's exits; `reader` is the thread's
    bus read side (see `kvmlet.bus.transactions`)."""
    run = vcpu.run
    io_read, io_write = io.read, io.write
    mmio_read, mmio_write = mmio.read, mmio.write
    from_bytes = int.from_bytes
    io_exits = mmio_exits = interrupted_exits = 0
    rare_exits = dict.fromkeys(EXIT_REASONS[3:], 0)

    def read_counts() -> dict[str, int]:
        return {"io": io_exits, "mmio": mmio_exits, "intr": interrupted_exits, **rare_exits}

    if counts is not None:
        counts._read = read_counts
    side = reader if reader is not None else Reader()
    while True:
        exit_ = run()
        side.sequence += 1  # dispatching: this thread may hold a view until it is even again
        try:
            kind = type(exit_)
            if kind is IoExit:
                io_exits += 1
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
                mmio_exits += 1
                size, data, address = exit_.size, exit_.data, exit_.address
                if exit_.is_write:
                    mmio_write(address, size, from_bytes(data, "little"))
                else:
                    data[:] = mmio_read(address, size).to_bytes(size, "little")
            elif kind is InterruptedExit:
                interrupted_exits += 1
                side.sequence += 1  # quiescent while `should_stop` may hold it (a pause)
                try:
                    stopping = should_stop()
                finally:
                    side.sequence += 1
                if stopping:
                    return None
            else:
                rare_exits[RARE_EXIT_NAMES.get(kind, "other")] += 1
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
