"""`Vm`: one KVM virtual machine (memory slots, in-kernel irqchip and PIT, irqfd/ioeventfd,
GSI routing, MSIs) and the factory of its vCPUs.

x86 set-up must happen in a fixed order that works on every KVM we met: identity map address,
TSS address, in-kernel irqchip, PIT2, then memory slots and vCPUs; `setup_x86_platform` does
exactly that.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple

from kvmlet.errors import KvmletError
from kvmlet.kvm import ioctls as nr
from kvmlet.kvm import structs as s
from kvmlet.kvm._syscall import failure, ioctl_int, ioctl_struct, ioctl_ulong
from kvmlet.kvm.vcpu import Vcpu

if TYPE_CHECKING:
    from kvmlet.kvm.system import Kvm

IDENTITY_MAP_ADDR = 0xFFFB_C000
"""One page KVM may use for real-mode paging emulation (just below the TSS, as kvmtool)."""
TSS_ADDR = 0xFFFB_D000
"""Three pages KVM uses for the real-mode TSS on Intel (kvmtool's and Firecracker's choice)."""


class IrqchipRoute(NamedTuple):
    """A GSI routed to a pin of the PIC (chip 0/1) or the IO-APIC (chip 2)."""

    gsi: int
    irqchip: int
    pin: int


class MsiRoute(NamedTuple):
    """A GSI that delivers a message-signalled interrupt (address, data)."""

    gsi: int
    address: int
    data: int


class MemorySlot(NamedTuple):
    """One KVM memory slot: guest-physical range backed by host memory."""

    slot: int
    guest_address: int
    size: int
    host_address: int
    readonly: bool = False


class SlotAllocator:
    """Hands out the lowest free KVM memory-slot number, up to the KVM's limit."""

    def __init__(self, limit: int):
        self.limit = limit
        self._used: set[int] = set()

    def allocate(self) -> int:
        for slot in range(self.limit):
            if slot not in self._used:
                self._used.add(slot)
                return slot
        raise KvmletError(f"out of KVM memory slots (this KVM allows {self.limit})")

    def release(self, slot: int) -> None:
        self._used.discard(slot)


class Vm:
    """A KVM virtual machine created on an open `Kvm`."""

    def __init__(self, kvm: Kvm):
        self.kvm = kvm
        try:
            self.fd = ioctl_int(kvm.fd, nr.KVM_CREATE_VM, 0)
        except OSError as error:
            raise failure("KVM_CREATE_VM", error) from None
        self.vcpu_mmap_size = kvm.vcpu_mmap_size()
        self.slots = SlotAllocator(kvm.check_extension(nr.KVM_CAP_NR_MEMSLOTS) or 32)
        self.memory: dict[int, MemorySlot] = {}

    # -- platform ---------------------------------------------------------------------------

    def set_identity_map_addr(self, address: int) -> None:
        self._call(
            "KVM_SET_IDENTITY_MAP_ADDR", nr.KVM_SET_IDENTITY_MAP_ADDR, ctypes.c_uint64(address)
        )

    def set_tss_addr(self, address: int) -> None:
        try:
            ioctl_ulong(self.fd, nr.KVM_SET_TSS_ADDR, address)
        except OSError as error:
            raise failure("KVM_SET_TSS_ADDR", error) from None

    def create_irqchip(self) -> None:
        """The in-kernel PIC pair, IO-APIC and local APICs."""
        try:
            ioctl_int(self.fd, nr.KVM_CREATE_IRQCHIP)
        except OSError as error:
            raise failure("KVM_CREATE_IRQCHIP", error) from None

    def create_pit2(self, speaker_dummy: bool = True) -> None:
        """The in-kernel i8254 PIT (with a dummy speaker port 0x61, as kvmtool and QEMU)."""
        config = s.KvmPitConfig(flags=nr.KVM_PIT_SPEAKER_DUMMY if speaker_dummy else 0)
        self._call("KVM_CREATE_PIT2", nr.KVM_CREATE_PIT2, config)

    def setup_x86_platform(
        self, identity_map_addr: int = IDENTITY_MAP_ADDR, tss_addr: int = TSS_ADDR
    ) -> None:
        """Identity map, TSS, irqchip, PIT2: in this order, before any vCPU.

        Best after the RAM slots: on some KVMs a slot added once the irqchip exists is much
        slower to register (docs/performance.md, "Boot")."""
        self.set_identity_map_addr(identity_map_addr)
        self.set_tss_addr(tss_addr)
        self.create_irqchip()
        self.create_pit2()

    # -- memory -----------------------------------------------------------------------------

    def set_memory_region(
        self, slot: int, guest_address: int, size: int, host_address: int, readonly: bool = False
    ) -> None:
        """KVM_SET_USER_MEMORY_REGION for an explicit slot number (size 0 deletes it)."""
        region = s.KvmUserspaceMemoryRegion(
            slot=slot,
            flags=nr.KVM_MEM_READONLY if readonly else 0,
            guest_phys_addr=guest_address,
            memory_size=size,
            userspace_addr=host_address,
        )
        self._call("KVM_SET_USER_MEMORY_REGION", nr.KVM_SET_USER_MEMORY_REGION, region)

    def add_memory(
        self, guest_address: int, size: int, host_address: int, readonly: bool = False
    ) -> MemorySlot:
        """Map host memory at a guest-physical range in a newly allocated slot."""
        slot = self.slots.allocate()
        try:
            self.set_memory_region(slot, guest_address, size, host_address, readonly)
        except KvmletError:
            self.slots.release(slot)
            raise
        region = MemorySlot(slot, guest_address, size, host_address, readonly)
        self.memory[slot] = region
        return region

    def remove_memory(self, slot: int) -> None:
        """Delete a slot made by `add_memory` and free its number."""
        region = self.memory[slot]
        self.set_memory_region(slot, region.guest_address, 0, region.host_address)
        del self.memory[slot]
        self.slots.release(slot)

    # -- interrupts -------------------------------------------------------------------------

    def irq_line(self, irq: int, level: bool) -> None:
        """Drive an interrupt line of the in-kernel irqchip high or low."""
        self._call("KVM_IRQ_LINE", nr.KVM_IRQ_LINE, s.KvmIrqLevel(irq, int(level)))

    def assign_irqfd(self, fd: int, gsi: int, resample_fd: int | None = None) -> None:
        """Writing to eventfd `fd` raises `gsi`; with `resample_fd`, a level-triggered line
        is lowered on guest EOI and `resample_fd` is signalled."""
        flags = 0 if resample_fd is None else nr.KVM_IRQFD_FLAG_RESAMPLE
        request = s.KvmIrqfd(fd=fd, gsi=gsi, flags=flags, resamplefd=resample_fd or 0)
        self._call("KVM_IRQFD", nr.KVM_IRQFD, request)

    def deassign_irqfd(self, fd: int, gsi: int) -> None:
        request = s.KvmIrqfd(fd=fd, gsi=gsi, flags=nr.KVM_IRQFD_FLAG_DEASSIGN)
        self._call("KVM_IRQFD (deassign)", nr.KVM_IRQFD, request)

    def assign_ioeventfd(
        self, fd: int, address: int, length: int, *, pio: bool, datamatch: int | None = None
    ) -> None:
        """Guest writes of `length` bytes (0: any) to `address` signal `fd` without an exit
        (only those writing `datamatch`, when given)."""
        self._call(
            "KVM_IOEVENTFD", nr.KVM_IOEVENTFD, _ioeventfd(fd, address, length, pio, datamatch, 0)
        )

    def deassign_ioeventfd(
        self, fd: int, address: int, length: int, *, pio: bool, datamatch: int | None = None
    ) -> None:
        request = _ioeventfd(fd, address, length, pio, datamatch, nr.KVM_IOEVENTFD_FLAG_DEASSIGN)
        self._call("KVM_IOEVENTFD (deassign)", nr.KVM_IOEVENTFD, request)

    def register_coalesced_zone(self, address: int, size: int, *, pio: bool) -> None:
        """Guest writes inside the zone go to the coalesced ring without an exit
        (KVM_CAP_COALESCED_MMIO; KVM_CAP_COALESCED_PIO for port I/O)."""
        zone = s.KvmCoalescedMmioZone(addr=address, size=size, pio=int(pio))
        self._call("KVM_REGISTER_COALESCED_MMIO", nr.KVM_REGISTER_COALESCED_MMIO, zone)

    def unregister_coalesced_zone(self, address: int, size: int, *, pio: bool) -> None:
        zone = s.KvmCoalescedMmioZone(addr=address, size=size, pio=int(pio))
        self._call("KVM_UNREGISTER_COALESCED_MMIO", nr.KVM_UNREGISTER_COALESCED_MMIO, zone)

    def set_gsi_routing(self, routes: Sequence[IrqchipRoute | MsiRoute]) -> None:
        """Replace the whole GSI routing table."""
        table = s.irq_routing_with(len(routes))()
        table.header.nr = len(routes)
        for entry, route in zip(table.entries, routes, strict=True):
            entry.gsi = route.gsi
            if isinstance(route, IrqchipRoute):
                entry.type = nr.KVM_IRQ_ROUTING_IRQCHIP
                entry.u.irqchip.irqchip = route.irqchip
                entry.u.irqchip.pin = route.pin
            else:
                entry.type = nr.KVM_IRQ_ROUTING_MSI
                entry.u.msi.address_lo = route.address & 0xFFFF_FFFF
                entry.u.msi.address_hi = route.address >> 32
                entry.u.msi.data = route.data
        self._call("KVM_SET_GSI_ROUTING", nr.KVM_SET_GSI_ROUTING, table)

    def signal_msi(self, address: int, data: int) -> bool:
        """Inject one MSI; False when the guest had it masked or blocked (KVM returned 0)."""
        message = s.KvmMsi(address_lo=address & 0xFFFF_FFFF, address_hi=address >> 32, data=data)
        return self._call("KVM_SIGNAL_MSI", nr.KVM_SIGNAL_MSI, message) > 0

    # -- clock ------------------------------------------------------------------------------

    def get_clock(self) -> s.KvmClockData:
        """KVM_GET_CLOCK: the kvmclock value the guest reads now (ns), with its flags
        (KVM_CLOCK_TSC_STABLE: the value is the same for every vCPU)."""
        return self._get("KVM_GET_CLOCK", nr.KVM_GET_CLOCK, s.KvmClockData())

    def set_clock(self, clock: int) -> None:
        """KVM_SET_CLOCK: make the guest's kvmclock read `clock` ns from now on."""
        self._call("KVM_SET_CLOCK", nr.KVM_SET_CLOCK, s.KvmClockData(clock=clock))

    # -- in-kernel devices -------------------------------------------------------------------

    def get_irqchip(self, chip_id: int) -> s.KvmIrqchip:
        """KVM_GET_IRQCHIP: the state of the PIC master (0), PIC slave (1) or IOAPIC (2)."""
        return self._get("KVM_GET_IRQCHIP", nr.KVM_GET_IRQCHIP, s.KvmIrqchip(chip_id=chip_id))

    def set_irqchip(self, chip: s.KvmIrqchip) -> None:
        self._call("KVM_SET_IRQCHIP", nr.KVM_SET_IRQCHIP, chip)

    def get_pit2(self) -> s.KvmPitState2:
        """KVM_GET_PIT2: the in-kernel i8254's three channels and flags."""
        return self._get("KVM_GET_PIT2", nr.KVM_GET_PIT2, s.KvmPitState2())

    def set_pit2(self, state: s.KvmPitState2) -> None:
        self._call("KVM_SET_PIT2", nr.KVM_SET_PIT2, state)

    # -- vCPUs and lifetime -----------------------------------------------------------------

    def create_vcpu(self, vcpu_id: int) -> Vcpu:
        """A vCPU with APIC ID `vcpu_id`, its kvm_run page mapped."""
        try:
            fd = ioctl_int(self.fd, nr.KVM_CREATE_VCPU, vcpu_id)
        except OSError as error:
            raise failure(f"KVM_CREATE_VCPU {vcpu_id}", error) from None
        return Vcpu(fd, vcpu_id, self.vcpu_mmap_size)

    def _get(self, what: str, request: int, argument):
        self._call(what, request, argument)
        return argument

    def _call(self, what: str, request: int, argument: ctypes.Structure | ctypes.c_uint64) -> int:
        try:
            return ioctl_struct(self.fd, request, argument)
        except OSError as error:
            raise failure(what, error) from None

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Vm:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _ioeventfd(
    fd: int, address: int, length: int, pio: bool, datamatch: int | None, flags: int
) -> s.KvmIoeventfd:
    if pio:
        flags |= nr.KVM_IOEVENTFD_FLAG_PIO
    if datamatch is not None:
        flags |= nr.KVM_IOEVENTFD_FLAG_DATAMATCH
    return s.KvmIoeventfd(datamatch=datamatch or 0, addr=address, len=length, fd=fd, flags=flags)
