"""KVM's part for eventfds attached to MSI vectors, played in the unit tier.

`IrqfdController` hands out `IrqfdVector`s, recording MSI vectors that behave as KVM's irqfds
do (virt/kvm/eventfd.c): a backend's write to an attached eventfd (`backend_write`) is read by
KVM and fires the vector; a count already in the eventfd at attach fires it once and stays;
a detach discards whatever count is left (KVM delivered it). `direct` counts those deliveries;
a direct delivery through a vector the guest has masked fails the test.

`StepWorker` is a device worker the test runs a round at a time; `IdleFrontend` a vhost backend
that accepts every request and never writes a call eventfd itself (the test plays the backend).
"""

from __future__ import annotations

import os
import select

from kvmlet.bus.pci.msi import RecordingMsiController, RecordingVector
from kvmlet.virtio.device import VIRTIO_F_VERSION_1


def readable(fd: int) -> bool:
    return bool(select.select([fd], [], [], 0)[0])


def drain(fd: int) -> int:
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0


class IrqfdVector(RecordingVector):
    def __init__(self) -> None:
        super().__init__()
        self.direct = 0

    def attach(self, eventfd: int) -> None:
        super().attach(eventfd)
        if readable(eventfd):
            self.deliver()

    def detach(self, eventfd: int) -> None:
        super().detach(eventfd)
        drain(eventfd)

    def deliver(self) -> None:
        """What KVM does for a write to an attached eventfd."""
        assert not self.masked, "an attached eventfd fired a vector the guest masked"
        self.direct += 1
        self.fire()


class IrqfdController(RecordingMsiController):
    def vector(self, index: int) -> IrqfdVector:
        return self.vectors.setdefault(index, IrqfdVector())

    def backend_write(self, eventfd: int) -> None:
        """A backend signals `eventfd`: KVM takes it if it is attached, else it counts."""
        owners = [vector for vector in self.vectors.values() if eventfd in vector.attached]
        assert len(owners) <= 1, "an eventfd attached to two vectors"
        if owners:
            drain(eventfd)
            owners[0].deliver()
        else:
            os.eventfd_write(eventfd, 1)


class Watch:
    """A readiness watch that remembers what its owner wants."""

    def __init__(self, fd: int, callback) -> None:
        self.fd = fd
        self.callback = callback
        self.wanted = (False, False)
        self.closed = False

    def want(self, readable: bool, writable: bool) -> None:
        self.wanted = (readable, writable)

    def close(self) -> None:
        self.closed = True


class StepWorker:
    """A device worker the test runs one round at a time (`round`), in its own thread."""

    def __init__(self) -> None:
        self.watches: list[Watch] = []

    def watch_readiness(self, fd: int, callback) -> Watch:
        self.watches.append(Watch(fd, callback))
        return self.watches[-1]

    def watch(self, fd: int, callback) -> None:
        """Plain eventfd watches (a vhost device's err eventfds) stay idle here."""

    def round(self) -> None:
        for watch in self.watches:
            if watch.wanted == (True, False) and not watch.closed and readable(watch.fd):
                watch.callback(True, False, False)


class IdleFrontend:
    """A vhost backend that accepts everything and never writes on its own."""

    name = "idle"
    needs_memory_fds = False
    max_vrings = None

    def guest_features(self):
        return 1 << VIRTIO_F_VERSION_1

    def get_vring_base(self, index):
        return 0

    def read_config(self, size):
        return None

    def fileno(self):
        return None

    def __getattr__(self, name):
        return lambda *arguments: None
