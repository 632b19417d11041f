"""Removing a region waits until no vCPU can still be dispatching through a view that has it.

A vCPU reads the published view once per access and may then call the handler of a region
that a concurrent change has just removed. Each vCPU marks its dispatches (an odd `sequence`
while inside one); `remove_subregion` returns only once every vCPU that was inside a dispatch
when the region left the view has left it (an RCU-style grace period), so whoever removed a
device may then tear it down.
"""

from __future__ import annotations

import threading

from kvmlet.bus import IoRegion, mmio_space, transaction, transactions
from kvmlet.bus.address_space import AddressSpace
from kvmlet.bus.region import Region


class Registers:
    def read(self, offset, size):
        return 0

    def write(self, offset, size, value):
        pass


def placed() -> tuple[AddressSpace, Region]:
    space = mmio_space()
    region = IoRegion("device", 0x100, Registers())
    space.root.add_subregion(0x1000, region)
    return space, region


class Vcpu(threading.Thread):
    """A thread that enters a dispatch, then leaves it when told to."""

    def __init__(self):
        super().__init__(daemon=True)
        self.inside, self.leave = threading.Event(), threading.Event()
        self.reader: transactions.Reader | None = None

    def run(self):
        self.reader = transactions.register_reader()
        try:
            self.reader.sequence += 1  # a dispatch begins: it may hold the old view
            self.inside.set()
            self.leave.wait(10)
            self.reader.sequence += 1
        finally:
            transactions.unregister_reader(self.reader)


def removal_in_thread(space, region) -> threading.Thread:
    remover = threading.Thread(target=space.root.remove_subregion, args=(region,), daemon=True)
    remover.start()
    return remover


def test_removal_waits_for_a_vcpu_inside_a_dispatch():
    space, region = placed()
    vcpu = Vcpu()
    vcpu.start()
    assert vcpu.inside.wait(5)
    remover = removal_in_thread(space, region)
    remover.join(0.3)
    assert remover.is_alive(), "the removal returned while a vCPU may still use the region"
    assert space.view.lookup(0x1000).region is None, "the new view is already published"
    vcpu.leave.set()
    remover.join(5)
    assert not remover.is_alive()


def test_vcpus_outside_a_dispatch_and_the_remover_itself_do_not_hold_it_up():
    space, region = placed()
    idle = transactions.register_reader()  # a vCPU inside KVM_RUN: even sequence
    try:
        remover = removal_in_thread(space, region)
        remover.join(5)
        assert not remover.is_alive()
        space.root.add_subregion(0x1000, region)
        idle.sequence += 1  # now this thread is a vCPU removing from inside its own dispatch
        space.root.remove_subregion(region)  # returns: its own dispatch is not waited for
    finally:
        transactions.unregister_reader(idle)


def test_inside_a_transaction_the_wait_comes_at_its_end():
    space, region = placed()
    vcpu = Vcpu()
    vcpu.start()
    assert vcpu.inside.wait(5)
    finished = threading.Event()

    def remove_in_transaction():
        with transaction():
            space.root.remove_subregion(region)
            finished.set()  # still inside: no waiting while the bus lock is held

    remover = threading.Thread(target=remove_in_transaction, daemon=True)
    remover.start()
    assert finished.wait(5)
    remover.join(0.3)
    assert remover.is_alive()
    with transactions.lock:  # the bus lock is free while it waits
        pass
    vcpu.leave.set()
    remover.join(5)
    assert not remover.is_alive()
