"""Keeps KVM in step with the bus: RAM sections become memory slots, doorbells ioeventfds.

The bus reports every change of its flat view as a difference (sections and notifiers added or
removed); this listener turns each into the matching KVM call. So when the guest moves a BAR,
its doorbells' ioeventfds move with it and the guest's notify writes never exit to Python.

When KVM refuses a call (KvmletError), the listener's state is left as KVM's is, and the bus
offers the change again at its next rebuild. Meanwhile the bus serves what KVM does not carry:
a doorbell without an ioeventfd exits to its region's handler, which kicks the device; RAM
without a slot is read and written by the dispatcher through its region.
"""

from __future__ import annotations

import ctypes
import mmap

from kvmlet.bus import IoEventNotifier, MemorySection
from kvmlet.kvm import MemorySlot, Vm
from kvmlet.memory import RamBank


def host_address(backing: RamBank | mmap.mmap | memoryview | bytearray, offset: int) -> int:
    """Host virtual address of byte `offset` of a RAM region's backing."""
    if isinstance(backing, RamBank):
        return backing.host_address() + offset
    buffer = backing.obj if isinstance(backing, memoryview) else backing
    return ctypes.addressof(ctypes.c_char.from_buffer(buffer)) + offset


def _fd(eventfd: object) -> int:
    return eventfd if isinstance(eventfd, int) else eventfd.fileno()  # type: ignore[union-attr]


class KvmBusListener:
    """A bus listener mapping RAM sections to KVM memory slots and notifiers to ioeventfds."""

    def __init__(self, vm: Vm):
        self.vm = vm
        self.slots: dict[MemorySection, MemorySlot] = {}
        self.ioeventfds: set[IoEventNotifier] = set()

    def region_added(self, section: MemorySection) -> None:
        address = host_address(section.backing, section.backing_offset)
        self.slots[section] = self.vm.add_memory(
            section.start, section.size, address, section.readonly
        )

    def region_removed(self, section: MemorySection) -> None:
        self.vm.remove_memory(self.slots[section].slot)
        del self.slots[section]

    def eventfd_added(self, notifier: IoEventNotifier) -> None:
        _apply(self.vm.assign_ioeventfd, notifier)
        self.ioeventfds.add(notifier)

    def eventfd_removed(self, notifier: IoEventNotifier) -> None:
        _apply(self.vm.deassign_ioeventfd, notifier)
        self.ioeventfds.discard(notifier)


def _apply(ioeventfd_call, notifier: IoEventNotifier) -> None:
    """Call Vm.assign_ioeventfd or Vm.deassign_ioeventfd for a notifier."""
    ioeventfd_call(
        _fd(notifier.eventfd),
        notifier.address,
        notifier.size,
        pio=notifier.port_io,
        datamatch=notifier.datamatch,
    )
