"""Coalesced I/O: guest writes that need no answer, kept off the exit path.

For a zone registered with KVM_REGISTER_COALESCED_MMIO (KVM_CAP_COALESCED_MMIO, and
KVM_CAP_COALESCED_PIO for ports), KVM appends each guest write to a ring and resumes the guest
without an exit to user space. The ring is one page per VM, shared by every vCPU's mapping at
page KVM_COALESCED_MMIO_PAGE_OFFSET (the capability's value): a header (`first`, the consumer's
index, ours; `last`, the producer's, KVM's) and 24-byte entries (address, length, port-I/O flag,
8 data bytes). A full ring makes KVM exit with the write as usual.

The run loop replays the ring through the bus, in order, before it handles any exit of any
vCPU (`CoalescedRing.drain`): a device therefore sees every write before the next access that
could observe it, which is what keeps coalescing exact: only registers whose writes have no
effect the guest could see without another access to the machine are registered (the POST
port, the RTC index port, PCI conf1's address latch, a UART's THR while no interrupt depends
on it). QEMU replays the same ring before it dispatches the accesses that need it.
"""

from __future__ import annotations

import struct
import threading

from kvmlet.bus import AddressSpace
from kvmlet.kvm import Vcpu, Vm

RING_HEADER = struct.Struct("<II")
ENTRY = struct.Struct("<QII8s")
"""phys_addr, len, pio, data[8]: `struct kvm_coalesced_mmio`."""
ENTRY_SIZE = ENTRY.size
PAGE_SIZE = 4096
RING_ENTRIES = (PAGE_SIZE - RING_HEADER.size) // ENTRY_SIZE
"""KVM_COALESCED_MMIO_MAX: the ring holds one entry fewer than this."""

_EMPTY_HEADER = memoryview(bytearray(RING_HEADER.size)).cast("I")


class CoalescedRing:
    """The VM's coalesced-write ring and its zones; `drain` replays it through the bus."""

    def __init__(self, vm: Vm, io: AddressSpace, mmio: AddressSpace):
        self._vm = vm
        self._page: memoryview | None = None
        self.header = _EMPTY_HEADER
        """`header[0]` (first) != `header[1]` (last) when writes wait: the run loop's test."""
        self._io_write = io.write
        self._mmio_write = mmio.write
        self._lock = threading.Lock()
        self.zones: set[tuple[int, int, bool]] = set()
        self.drained = 0

    def map_from(self, vcpu: Vcpu, page_offset: int) -> None:
        """Reach the ring through `vcpu`'s mapping (`page_offset`: KVM_CAP_COALESCED_MMIO's
        value); until then there is nothing to drain. `close` before the vCPU closes."""
        start = page_offset * PAGE_SIZE
        self._page = vcpu.run_page[start : start + PAGE_SIZE]
        self.header = self._page[: RING_HEADER.size].cast("I")

    def set_zone(self, address: int, size: int, *, pio: bool, enabled: bool) -> None:
        """Register (or unregister) a zone; doing what is already done does nothing."""
        zone = (address, size, pio)
        if enabled == (zone in self.zones):
            return
        if enabled:
            self._vm.register_coalesced_zone(address, size, pio=pio)
            self.zones.add(zone)
        else:
            self.drain()  # writes KVM took under the zone go before whatever ends it
            self._vm.unregister_coalesced_zone(address, size, pio=pio)
            self.zones.discard(zone)

    def drain(self) -> None:
        """Replay every waiting write through the bus, oldest first."""
        with self._lock:
            header, page = self.header, self._page
            first = header[0]
            while first != header[1] and page is not None:
                address, length, pio, data = ENTRY.unpack_from(
                    page, RING_HEADER.size + first * ENTRY_SIZE
                )
                first = (first + 1) % RING_ENTRIES
                header[0] = first  # hand the slot back before a handler that might raise
                self.drained += 1
                if 1 <= length <= 8:
                    value = int.from_bytes(data[:length], "little")
                    (self._io_write if pio else self._mmio_write)(address, length, value)

    def close(self) -> None:
        """Release the views of the vCPU's mapping (the ring is gone with the VM)."""
        header, self.header = self.header, _EMPTY_HEADER
        if self._page is not None:
            header.release()
            self._page.release()
            self._page = None


EMPTY_RING_HEADER = _EMPTY_HEADER
"""A ring header that never has writes waiting (for a run loop with no coalescing)."""
