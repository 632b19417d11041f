"""Listeners (the KVM layer) stay in step with the flat view even when they refuse a change.

KVM can refuse a memory slot or an ioeventfd (EEXIST, ENOSPC, ENOMEM). The bus then keeps
going with the rest of the change, counts the refusal, and offers the refused part again at
every later rebuild, so KVM's state converges on the view instead of drifting from it. What
KVM does not carry, the bus serves: a doorbell without an ioeventfd exits to its handler, RAM
without a slot is read and written through its region.
"""

from __future__ import annotations

from hypothesis import example, given, settings
from hypothesis import strategies as st

from kvmlet.bus import IoRegion, RamRegion, RecordingListener, mmio_space


class Null:
    def read(self, offset, size):
        return 0

    def write(self, offset, size, value):
        pass


class RefusingListener(RecordingListener):
    """A RecordingListener that refuses (raises, as the KVM layer does) what `refuse` says."""

    def __init__(self, refuse):
        super().__init__()
        self.refuse = refuse
        self.refusals = 0

    def _check(self, kind, item):
        if self.refuse(kind, item):
            self.refusals += 1
            raise OSError(17, f"KVM refused {kind}")

    def region_added(self, section):
        self._check("region_added", section)
        super().region_added(section)

    def region_removed(self, section):
        self._check("region_removed", section)
        super().region_removed(section)

    def eventfd_added(self, notifier):
        self._check("eventfd_added", notifier)
        super().eventfd_added(notifier)

    def eventfd_removed(self, notifier):
        self._check("eventfd_removed", notifier)
        super().eventfd_removed(notifier)


def in_step(space, listener) -> bool:
    return listener.sections == set(space.view.sections) and listener.notifiers == set(
        space.view.notifiers
    )


def test_a_refused_change_does_not_stop_the_rest_and_is_offered_again():
    space = mmio_space()
    refused = {"address": 0x1000}
    listener = RefusingListener(
        lambda kind, item: kind == "eventfd_added" and item.address == refused["address"]
    )
    space.add_listener(listener)
    device = IoRegion("device", 0x100, Null())
    device.add_eventfd(0, 2, 101)
    device.add_eventfd(0x10, 2, 102)
    ram = RamRegion("ram", 0x1000, bytearray(0x1000))
    with space.transaction():
        space.root.add_subregion(0x1000, device)
        space.root.add_subregion(0x8000, ram)
    assert {n.address for n in listener.notifiers} == {0x1010}, "the rest went through"
    assert {s.start for s in listener.sections} == {0x8000}
    assert space.listener_errors == 1
    refused["address"] = None  # KVM would take it now
    ram.set_readonly(True)  # any later change of the space
    assert in_step(space, listener), "the refused doorbell was offered again"


def test_a_refused_removal_is_retried_too():
    space = mmio_space()
    refusing = {"on": True}
    listener = RefusingListener(lambda kind, item: kind == "region_removed" and refusing["on"])
    space.add_listener(listener)
    ram = RamRegion("ram", 0x1000, bytearray(0x1000))
    space.root.add_subregion(0, ram)
    ram.disable()
    assert len(listener.sections) == 1 and space.listener_errors == 1
    refusing["on"] = False
    space.root.add_subregion(0x4000, RamRegion("more", 0x1000, bytearray(0x1000)))
    assert in_step(space, listener)


@settings(max_examples=100, deadline=None)
@example(moves=[(0, 3, True), (1, 3, True)], flaky_slots=set())  # two regions, one address
@given(
    st.lists(st.tuples(st.integers(0, 2), st.integers(0, 7), st.booleans()), max_size=20),
    st.sets(st.integers(0, 7)),
)
def test_whatever_is_refused_the_listener_converges_once_kvm_accepts(moves, flaky_slots):
    """Regions move around while the listener refuses everything at some addresses; once it
    accepts again, one rebuild brings it exactly to the view."""
    space = mmio_space()
    accepting = {"on": False}

    def refuse(kind, item):
        start = getattr(item, "start", getattr(item, "address", 0))
        return not accepting["on"] and start // 0x1000 in flaky_slots

    listener = RefusingListener(refuse)
    space.add_listener(listener)
    regions = []
    for index in range(3):
        region = IoRegion(f"d{index}", 0x1000, Null())
        region.add_eventfd(4, 4, 200 + index)
        regions.append(region)
        space.root.add_subregion(0x10000 + index * 0x1000, region)
    ram = RamRegion("ram", 0x1000, bytearray(0x1000))
    space.root.add_subregion(0x20000, ram)
    for index, slot, visible in moves:
        region = regions[index]
        region.move(slot * 0x1000)
        region.set_enabled(visible)
        ram.move(((slot + 3) % 8) * 0x1000)
    accepting["on"] = True
    ram.set_readonly(not ram.readonly)
    assert in_step(space, listener)
    addresses = [n.address for n in space.view.notifiers]
    assert len(addresses) == len(set(addresses)), "at most one doorbell per address"
