"""The vCPU run loop without KVM: a fake vCPU hands it exits, the loop says how the guest ended."""

from __future__ import annotations

import pytest

from kvmlet.bus import mmio_space, port_io_space
from kvmlet.kvm.exits import (
    KVM_SYSTEM_EVENT_CRASH,
    KVM_SYSTEM_EVENT_RESET,
    KVM_SYSTEM_EVENT_SHUTDOWN,
    SystemEventExit,
)
from kvmlet.vstate.vcpu_loop import StopReason, run_vcpu


class FakeVcpu:
    """Returns the given exits from run(), one per call."""

    id = 0

    def __init__(self, *exits):
        self.exits = list(exits)

    def run(self):
        return self.exits.pop(0)


def run(*exits):
    return run_vcpu(FakeVcpu(*exits), port_io_space(), mmio_space(), lambda: False)


@pytest.mark.parametrize(
    ("kind", "reason"),
    [
        (KVM_SYSTEM_EVENT_SHUTDOWN, StopReason.POWER_OFF),
        (KVM_SYSTEM_EVENT_RESET, StopReason.RESET),
        (KVM_SYSTEM_EVENT_CRASH, StopReason.GUEST_CRASH),
    ],
)
def test_system_events_kvm_defines_stop_the_guest_as_they_say(kind, reason):
    assert run(SystemEventExit(kind)).reason is reason


@pytest.mark.parametrize("kind", [4, 5, 6, 99])
def test_an_unknown_system_event_is_an_unexpected_stop_not_a_clean_power_off(kind):
    stop = run(SystemEventExit(kind, (1, 2)))
    assert stop.reason is StopReason.UNEXPECTED_SYSTEM_EVENT
    assert stop.reason.exit_status not in (0, StopReason.POWER_OFF.exit_status)
    assert str(kind) in stop.detail


def test_the_loop_marks_each_dispatch_for_the_bus_grace_period():
    """The vCPU's read side is odd while an exit is dispatched (it may hold a view) and even
    while the guest runs, so a region's removal waits for exactly the dispatches in flight."""
    from kvmlet.bus import IoRegion, transactions
    from kvmlet.kvm import IoExit

    seen = []
    reader = transactions.register_reader()

    class Port:
        def read(self, offset, size):
            seen.append(("handler", reader.sequence & 1))
            return 0

        def write(self, offset, size, value):
            seen.append(("handler", reader.sequence & 1))

    class Vcpu(FakeVcpu):
        def run(self):
            seen.append(("guest", reader.sequence & 1))
            return super().run()

    io = port_io_space()
    io.root.add_subregion(0x10, IoRegion("port", 1, Port()))
    exits = []
    for is_write in (False, True):
        exit_ = IoExit()
        exit_.port, exit_.size, exit_.count, exit_.is_write = 0x10, 1, 1, is_write
        exit_.data = memoryview(bytearray(1))
        exits.append(exit_)
    try:
        stop = run_vcpu(
            Vcpu(*exits, SystemEventExit(KVM_SYSTEM_EVENT_SHUTDOWN)),
            io,
            mmio_space(),
            lambda: False,
            reader=reader,
        )
    finally:
        transactions.unregister_reader(reader)
    assert stop.reason is StopReason.POWER_OFF
    assert seen == [("guest", 0), ("handler", 1), ("guest", 0), ("handler", 1), ("guest", 0)]
    assert reader.sequence % 2 == 0


def test_a_vcpu_held_in_should_stop_is_quiescent_for_the_bus():
    """A pause holds the vCPU in `should_stop` after an interrupted KVM_RUN, with no view in
    use: its read side is even there, so a region removal meanwhile does not wait for it."""
    from kvmlet.bus import transactions
    from kvmlet.kvm import InterruptedExit

    seen = []
    reader = transactions.register_reader()

    def should_stop():
        seen.append(reader.sequence & 1)
        return len(seen) == 2

    try:
        stop = run_vcpu(
            FakeVcpu(InterruptedExit(), InterruptedExit()),
            port_io_space(),
            mmio_space(),
            should_stop,
            reader=reader,
        )
    finally:
        transactions.unregister_reader(reader)
    assert stop is None
    assert seen == [0, 0]
    assert reader.sequence % 2 == 0


@pytest.mark.parametrize("reason", [StopReason.WATCH_FAILED, StopReason.UNEXPECTED_SYSTEM_EVENT])
def test_a_stop_of_kvmlets_own_has_an_exit_status_no_other_reason_has(reason):
    """A script tells a failed watch from an unknown system event by the exit status alone
    (DEBUG_EXIT's status is the guest's choice, always odd: the system event's is even)."""
    others = [r.exit_status for r in StopReason if r not in (reason, StopReason.DEBUG_EXIT)]
    assert reason.exit_status not in others
    assert StopReason.UNEXPECTED_SYSTEM_EVENT.exit_status % 2 == 0
