"""KvmBusListener without KVM: what it asks of the VM for each change of the flat view."""

from __future__ import annotations

import pytest

from kvmlet.bus import RamRegion, mmio_space
from kvmlet.errors import KvmletError
from kvmlet.kvm import MemorySlot
from kvmlet.vstate.bus_listener import KvmBusListener


class FakeVm:
    """Records memory-slot calls; `refuse_removal` makes the next removal fail as KVM can."""

    def __init__(self):
        self.slots: dict[int, MemorySlot] = {}
        self.next_slot = 0
        self.refuse_removal = False

    def add_memory(self, guest_address, size, host_address, readonly=False):
        slot = MemorySlot(self.next_slot, guest_address, size, host_address, readonly)
        self.slots[slot.slot] = slot
        self.next_slot += 1
        return slot

    def remove_memory(self, slot):
        if self.refuse_removal:
            self.refuse_removal = False
            raise KvmletError("KVM refused")
        del self.slots[slot]


def test_the_read_only_flag_reaches_the_memory_slot():
    vm = FakeVm()
    space = mmio_space()
    space.add_listener(KvmBusListener(vm))
    rom = RamRegion("rom", 0x1000, bytearray(0x1000), readonly=True)
    space.root.add_subregion(0xF0000, rom)
    assert [(s.guest_address, s.readonly) for s in vm.slots.values()] == [(0xF0000, True)]
    rom.set_readonly(False)
    assert [(s.guest_address, s.readonly) for s in vm.slots.values()] == [(0xF0000, False)]


def test_a_slot_kvm_refused_to_remove_is_removed_at_the_next_change():
    vm = FakeVm()
    space = mmio_space()
    listener = KvmBusListener(vm)
    space.add_listener(listener)
    ram = RamRegion("ram", 0x1000, bytearray(0x1000))
    space.root.add_subregion(0, ram)
    vm.refuse_removal = True
    ram.disable()
    assert len(vm.slots) == 1 and len(listener.slots) == 1, "KVM still has it: so do we"
    space.root.add_subregion(0x10000, RamRegion("other", 0x1000, bytearray(0x1000)))
    assert [s.guest_address for s in vm.slots.values()] == [0x10000]
    assert set(listener.slots) == set(space.view.sections)


@pytest.mark.parametrize("readonly", [True, False])
def test_sections_carry_their_region_s_read_only_flag(readonly):
    space = mmio_space()
    space.root.add_subregion(0, RamRegion("ram", 0x1000, bytearray(0x1000), readonly=readonly))
    assert [s.readonly for s in space.view.sections] == [readonly]
