"""The KVM side of device interrupts: the GSI routing table, MSI vectors and legacy lines.

`KvmInterruptRouter(vm)` owns the VM's GSI routing table. KVM_SET_GSI_ROUTING replaces the whole
table, so the router always installs KVM's default irqchip routes first (GSI 0-15 on the PIC
pins and GSI 0-23 on the IO-APIC pins, identity-mapped, as KVM's own default table has them)
and then one MSI route per programmed vector. Legacy devices keep working through KVM_IRQ_LINE.

Each MSI vector (`KvmMsiVector`) gets a GSI (from 24 up) and an eventfd bound to it with
KVM_IRQFD, so `fire()` is one eventfd write from any thread, with no ioctl. When the guest
reprograms a vector (address, data) the router re-installs the table, once per unmasked change
and once per `batch()` of changes; a masked vector keeps its old route (its device makes it
pending instead of firing it).

Another eventfd can be attached to a vector (`attach`): a second irqfd on the vector's GSI, as
QEMU does for a vhost backend's call eventfd, so the backend's write interrupts the guest with
no Python step. KVM reads the eventfd when it injects; at assignment it injects a count already
there once (leaving it in the eventfd), and deassignment (`detach`) discards what is left, all
of it delivered. The router installs pending route changes first, so an attached eventfd never
fires through a stale route.

Legacy pins: `KvmIrqLine(vm, gsi)` drives a line with KVM_IRQ_LINE; `IrqfdLine` drives it
through an irqfd: edges are one eventfd write, a level line uses KVM's resample eventfd, which
KVM signals when the guest EOIs (after lowering the line); the line is raised again then only if
the device still asserts it. Something must call `resampled()` when `resample_fd` is readable
(a `QueueWorker.watch`).
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator

from kvmlet.errors import KvmletError
from kvmlet.kvm import ioctls as nr
from kvmlet.kvm.vm import IrqchipRoute, MsiRoute, Vm

IOAPIC_PINS = 24
PIC_PINS = 16
FIRST_MSI_GSI = IOAPIC_PINS
DEFAULT_GSI_LIMIT = 1024


def default_routes() -> list[IrqchipRoute]:
    """KVM's default x86 table: GSI n on IO-APIC pin n, and for n < 16 on PIC n // 8, pin n % 8."""
    routes = []
    for gsi in range(IOAPIC_PINS):
        routes.append(IrqchipRoute(gsi, nr.KVM_IRQCHIP_IOAPIC, gsi))
        if gsi < PIC_PINS:
            chip = nr.KVM_IRQCHIP_PIC_MASTER if gsi < 8 else nr.KVM_IRQCHIP_PIC_SLAVE
            routes.append(IrqchipRoute(gsi, chip, gsi % 8))
    return routes


def _eventfd() -> int:
    return os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)


class KvmMsiVector:
    """One MSI-X vector: a GSI routed to the guest's message and an irqfd on it."""

    def __init__(self, router: KvmInterruptRouter, gsi: int):
        self.router = router
        self.gsi = gsi
        self.eventfd = _eventfd()
        self.routed: tuple[int, int] | None = None
        self.fired = 0
        self.attached: set[int] = set()

    def update(self, address: int, data: int, masked: bool) -> None:
        if not masked and self.routed != (address, data):
            self.router.route(self, address, data)

    def fire(self) -> None:
        self.fired += 1
        os.eventfd_write(self.eventfd, 1)

    def attach(self, eventfd: int) -> None:
        self.router.attach(self, eventfd)

    def detach(self, eventfd: int) -> None:
        self.router.detach(self, eventfd)


class KvmMsiController:
    """The `MsiController` of one device: its vectors, allocated on first use."""

    def __init__(self, router: KvmInterruptRouter):
        self.router = router
        self.vectors: dict[int, KvmMsiVector] = {}

    def vector(self, index: int) -> KvmMsiVector:
        if index not in self.vectors:
            self.vectors[index] = self.router.allocate_vector()
        return self.vectors[index]

    def batch(self) -> contextlib.AbstractContextManager[None]:
        return self.router.batch()


class KvmInterruptRouter:
    """Owner of the VM's GSI routing table and of every MSI vector's GSI and irqfd."""

    def __init__(self, vm: Vm, gsi_limit: int | None = None):
        self.vm = vm
        capability = vm.kvm.check_extension(nr.KVM_CAP_IRQ_ROUTING)
        self.gsi_limit = gsi_limit or min(capability or DEFAULT_GSI_LIMIT, DEFAULT_GSI_LIMIT)
        self.vectors: list[KvmMsiVector] = []
        self.msi_routes: dict[int, MsiRoute] = {}
        self.table_updates = 0
        self._next_gsi = FIRST_MSI_GSI
        self._batch_depth = 0
        self._dirty = False
        self._lock = threading.RLock()

    def controller(self) -> KvmMsiController:
        """A fresh `MsiController` for one device."""
        return KvmMsiController(self)

    def allocate_vector(self) -> KvmMsiVector:
        """A vector with its own GSI and an eventfd bound to that GSI with KVM_IRQFD."""
        with self._lock:
            if self._next_gsi >= self.gsi_limit:
                raise KvmletError(f"out of GSIs for MSI vectors (limit {self.gsi_limit})")
            vector = KvmMsiVector(self, self._next_gsi)
            self._next_gsi += 1
            try:
                self.vm.assign_irqfd(vector.eventfd, vector.gsi)
            except KvmletError:
                os.close(vector.eventfd)
                raise
            self.vectors.append(vector)
            return vector

    def route(self, vector: KvmMsiVector, address: int, data: int) -> None:
        """Send `vector`'s GSI to (address, data) from now on."""
        with self._lock:
            vector.routed = (address, data)
            self.msi_routes[vector.gsi] = MsiRoute(vector.gsi, address, data)
            self._dirty = True
            if self._batch_depth == 0:
                self.commit()

    def attach(self, vector: KvmMsiVector, eventfd: int) -> None:
        """A second irqfd on `vector`'s GSI: writes to `eventfd` deliver its message."""
        with self._lock:
            if self._dirty:
                self.commit()
            self.vm.assign_irqfd(eventfd, vector.gsi)
            vector.attached.add(eventfd)

    def detach(self, vector: KvmMsiVector, eventfd: int) -> None:
        """Remove the irqfd `attach` made (nothing once the VM is closed)."""
        with self._lock:
            if eventfd in vector.attached and self.vm.fd >= 0:
                self.vm.deassign_irqfd(eventfd, vector.gsi)
            vector.attached.discard(eventfd)

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """Route changes inside are installed with one KVM_SET_GSI_ROUTING at the end."""
        with self._lock:
            self._batch_depth += 1
            try:
                yield
            finally:
                self._batch_depth -= 1
                if self._batch_depth == 0 and self._dirty:
                    self.commit()

    def commit(self) -> None:
        """Install the default irqchip routes plus every MSI route."""
        with self._lock:
            routes = [*default_routes(), *(self.msi_routes[gsi] for gsi in sorted(self.msi_routes))]
            self.vm.set_gsi_routing(routes)
            self.table_updates += 1
            self._dirty = False

    def close(self) -> None:
        """Unbind and close every vector's eventfd (before the VM is closed)."""
        with self._lock:
            for vector in self.vectors:
                if self.vm.fd >= 0:
                    self.vm.deassign_irqfd(vector.eventfd, vector.gsi)
                os.close(vector.eventfd)
            self.vectors.clear()


class KvmIrqLine:
    """An `IrqLine` on GSI `gsi` driven with KVM_IRQ_LINE (one ioctl per change)."""

    def __init__(self, vm: Vm, gsi: int):
        self.vm = vm
        self.gsi = gsi

    def set_level(self, high: bool) -> None:
        self.vm.irq_line(self.gsi, high)

    def pulse(self) -> None:
        self.vm.irq_line(self.gsi, True)
        self.vm.irq_line(self.gsi, False)


class IrqfdLine:
    """An `IrqLine` on GSI `gsi` driven through an irqfd (an eventfd write, no ioctl).

    `level=False`: each rise (or pulse) is an edge. `level=True`: KVM keeps the line high until
    the guest's EOI, then lowers it and signals `resample_fd`; `resampled()` raises it again
    while the device still asserts it."""

    def __init__(self, vm: Vm, gsi: int, level: bool = True):
        self.vm = vm
        self.gsi = gsi
        self.level = level
        self.asserted = False
        self.raises = 0
        self.trigger_fd = _eventfd()
        self.resample_fd = _eventfd() if level else None
        try:
            vm.assign_irqfd(self.trigger_fd, gsi, self.resample_fd)
        except KvmletError:
            self._close_fds()
            raise
        self._lock = threading.Lock()

    def set_level(self, high: bool) -> None:
        with self._lock:
            rising = high and not self.asserted
            self.asserted = high
            if rising or (high and self.level):
                self._raise()

    def pulse(self) -> None:
        with self._lock:
            self._raise()
            self.asserted = False

    def resampled(self) -> None:
        """The guest EOIed the interrupt and KVM lowered the line: re-raise if still asserted."""
        if self.resample_fd is None:
            return
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self.resample_fd)
        with self._lock:
            if self.asserted:
                self._raise()

    def _raise(self) -> None:
        self.raises += 1
        os.eventfd_write(self.trigger_fd, 1)

    def _close_fds(self) -> None:
        for fd in (self.trigger_fd, self.resample_fd):
            if fd is not None:
                os.close(fd)

    def close(self) -> None:
        if self.vm.fd >= 0:
            self.vm.deassign_irqfd(self.trigger_fd, self.gsi)
        self._close_fds()
