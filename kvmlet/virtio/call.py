"""A queue's interrupt that a backend signals on an eventfd: bound to an MSI-X vector, or relayed.

A vhost backend (a vhost-user daemon, the kernel's vhost) writes a queue's *call* eventfd when
it has used buffers. Two parties can turn that write into the guest's interrupt, one at a time:

- bound: the transport attached the eventfd to the MSI-X vector the driver chose for the queue
  (`MsiVector.attach`: a second KVM irqfd on the vector's GSI), so the write interrupts the
  guest in the kernel, with no Python step;
- relayed: the device's worker watches the eventfd (a level-triggered readiness watch) and
  `ready` drains it and calls `relay`, which raises the queue's interrupt through the transport.
  That is right in every other case: a masked vector (its pending bit), no vector, INTx with
  ISR, virtio-mmio's level line and status register.

The transport calls `bind(vector)` whenever the queue's vector or its mask may have changed
(None: relay). Each write is delivered once: the eventfd is drained only under the lock `bind`
holds while it switches, and the watch is off while bound. KVM delivers a count already in the
eventfd once when it attaches and discards it when it detaches, so a relay never drains a
count KVM delivered; back on the relay, `bind` checks the eventfd once itself, so a write that
came while it switched reaches the pending bit before the guest's mask write completes.

Direct deliveries are counted by nobody (that is the point); `relayed` counts the Python ones.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from kvmlet.errors import KvmletError, LazyLogger

if TYPE_CHECKING:
    from kvmlet.bus.pci.msi import MsiVector

log = LazyLogger(__name__)


class ReadinessWatch(Protocol):
    """What the worker's `watch_readiness` returns (see `kvmlet.virtio.worker`)."""

    def want(self, readable: bool, writable: bool) -> None: ...

    def close(self) -> None: ...


class CallEventfd:
    """One queue's call eventfd and who delivers its writes; see the module docstring."""

    def __init__(self, name: str, relay: Callable[[], None]):
        """`relay()` raises the queue's interrupt through the transport (called with no lock
        of this object held, from the worker or from `bind`)."""
        self.name = name
        self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.vector: MsiVector | None = None
        self.relayed = 0
        self.binds = 0
        self._relay = relay
        self._watch: ReadinessWatch | None = None
        self._refused = False
        self._closed = False
        self._lock = threading.Lock()

    @property
    def bound(self) -> bool:
        """Whether KVM delivers the writes straight to an MSI-X vector."""
        return self.vector is not None

    def connect_watch(self, watch: ReadinessWatch) -> None:
        """The worker's readiness watch on `fd`, whose callback is `ready`."""
        with self._lock:
            self._watch = watch
            watch.want(self.vector is None and not self._closed, False)

    def ready(self, readable: bool, writable: bool, hangup: bool) -> None:
        """The worker saw `fd` readable: relay what it counts, unless it is bound by now."""
        with self._lock:
            count = 0 if self.vector is not None or self._closed else _drain(self.fd)
        if count:
            self._deliver()

    def bind(self, vector: MsiVector | None) -> None:
        """Deliver the writes through `vector` from now on (None: relay them)."""
        with self._lock:
            if vector is self.vector or self._closed:
                return
            self._unbind()
            if vector is not None:
                self._bind(vector)
            count = _drain(self.fd) if self.vector is None else 0
        if count:
            self._deliver()

    def _bind(self, vector: MsiVector) -> None:
        if self._watch is not None:
            self._watch.want(False, False)
        try:
            vector.attach(self.fd)
        except KvmletError as error:
            if not self._refused:
                self._refused = True
                log.warning("%s: interrupts stay relayed: %s", self.name, error)
            if self._watch is not None:
                self._watch.want(True, False)
            return
        self.vector = vector
        self.binds += 1

    def _unbind(self) -> None:
        vector, self.vector = self.vector, None
        if vector is None:
            return
        try:
            vector.detach(self.fd)
        except KvmletError as error:
            log.warning("%s: detaching the call eventfd failed: %s", self.name, error)
        if self._watch is not None and not self._closed:
            self._watch.want(True, False)

    def _deliver(self) -> None:
        self.relayed += 1
        self._relay()

    def stats(self) -> dict[str, object]:
        return {
            "path": "irqfd" if self.bound else "relay",
            "relayed": self.relayed,
            "binds": self.binds,
        }

    def close(self) -> None:
        """Unbind, stop the watch and close the eventfd (after the backend let go of it)."""
        with self._lock:
            self._closed = True
            self._unbind()
            if self._watch is not None:
                self._watch.close()
                self._watch = None
            os.close(self.fd)
            self.fd = -1


def _drain(fd: int) -> int:
    """Read and reset an eventfd's count (0 when nothing was written)."""
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0
