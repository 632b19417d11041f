"""MSI-X (PCI 3.0 §6.8.2): the capability, the vector table and the pending-bit array.

A device model never talks to KVM: it is handed an `MsiController` whose `vector(index)` gives
an `MsiVector` to program (`update(address, data, masked)`) and to signal (`fire()`). An
eventfd that someone else signals (a vhost backend's call eventfd) can also be attached to a
vector (`attach(eventfd)`), so that each write to it delivers the message with no Python step,
until `detach(eventfd)`. The machine supplies the KVM implementation
(`kvmlet.vstate.interrupts`: a GSI route and an irqfd per vector, extra irqfds on the same GSI
for attached eventfds); tests supply `RecordingMsiController`.

`Msix` keeps the guest-visible state: the capability's enable and function-mask bits, a table of
16-byte entries (address low, address high, data, vector control) and the pending bits. A vector
that is signalled while masked (its own mask, the function mask, or MSI-X disabled) sets its
pending bit instead, and fires when the guest unmasks it. The controller hears of an entry only
as (address, data, effectively masked), so it can re-route once, when the guest unmasks a
vector it has reprogrammed.
"""

from __future__ import annotations

import threading
from contextlib import AbstractContextManager, nullcontext
from typing import Protocol

from kvmlet.bus.pci.device import PciDevice
from kvmlet.errors import KvmletError

MSIX_CAPABILITY_ID = 0x11
MESSAGE_CONTROL = 2
"""Offset of Message Control from the capability's first byte."""
CONTROL_ENABLE = 1 << 15
CONTROL_FUNCTION_MASK = 1 << 14
ENTRY_SIZE = 16
VECTOR_CONTROL_MASKED = 1
MAX_VECTORS = 2048
NO_VECTOR = 0xFFFF
"""What a device stores for "no MSI-X vector" (virtio's VIRTIO_MSI_NO_VECTOR)."""


class MsiVector(Protocol):
    """One message-signalled interrupt as the machine delivers it."""

    def update(self, address: int, data: int, masked: bool) -> None:
        """The guest (re)programmed the message, or (un)masked it."""

    def fire(self) -> None:
        """Deliver the message once (callable from any thread)."""

    def attach(self, eventfd: int) -> None:
        """Deliver the message on every write to `eventfd` from now on, without this process;
        a count already in `eventfd` is delivered once at once (KvmletError if refused)."""

    def detach(self, eventfd: int) -> None:
        """Stop delivering on writes to `eventfd`; whatever was written before has been
        delivered, later writes stay counted in `eventfd`."""


class MsiController(Protocol):
    """Where a device's MSI-X vectors come from."""

    def vector(self, index: int) -> MsiVector:
        """The delivery object of vector `index` of this device (the same one on each call)."""

    def batch(self) -> AbstractContextManager[None]:
        """A context in which several vector updates may be applied together."""


class RecordingVector:
    """An `MsiVector` that remembers its message, every delivery and the eventfds attached to
    it (tests, tracing). It only records: what the kernel does with an attached eventfd is the
    test's to play. `refuse_attach` makes `attach` fail as KVM may."""

    def __init__(self) -> None:
        self.address = 0
        self.data = 0
        self.masked = True
        self.updates: list[tuple[int, int, bool]] = []
        self.fired: list[tuple[int, int]] = []
        self.attached: set[int] = set()
        self.attachments: list[tuple[str, int]] = []
        self.refuse_attach = False

    def update(self, address: int, data: int, masked: bool) -> None:
        self.address, self.data, self.masked = address, data, masked
        self.updates.append((address, data, masked))

    def fire(self) -> None:
        self.fired.append((self.address, self.data))

    def attach(self, eventfd: int) -> None:
        if self.refuse_attach or eventfd in self.attached:
            raise KvmletError(f"KVM_IRQFD refused eventfd {eventfd}")
        self.attached.add(eventfd)
        self.attachments.append(("attach", eventfd))

    def detach(self, eventfd: int) -> None:
        self.attached.remove(eventfd)
        self.attachments.append(("detach", eventfd))


class RecordingMsiController:
    """An `MsiController` of `RecordingVector`s."""

    def __init__(self) -> None:
        self.vectors: dict[int, RecordingVector] = {}
        self.batches = 0

    def vector(self, index: int) -> RecordingVector:
        return self.vectors.setdefault(index, RecordingVector())

    def batch(self) -> AbstractContextManager[None]:
        self.batches += 1
        return nullcontext()


class Msix:
    """The MSI-X state of one function; the device maps `table_*` and `pba_*` into a BAR."""

    def __init__(self, controller: MsiController, vector_count: int):
        if not 0 < vector_count <= MAX_VECTORS:
            raise ValueError(f"MSI-X table size {vector_count} is not 1-{MAX_VECTORS}")
        self.controller = controller
        self.vector_count = vector_count
        self.enabled = False
        self.function_masked = False
        self.table = bytearray(ENTRY_SIZE * vector_count)
        for index in range(vector_count):
            self.table[ENTRY_SIZE * index + 12] = VECTOR_CONTROL_MASKED
        self.pending = [False] * vector_count
        self.vectors = [controller.vector(index) for index in range(vector_count)]
        self.fired = [0] * vector_count
        self.capability_offset: int | None = None
        self._device: PciDevice | None = None
        self._lock = threading.Lock()

    @property
    def table_size(self) -> int:
        return ENTRY_SIZE * self.vector_count

    @property
    def pba_size(self) -> int:
        """The pending-bit array in whole qwords, as the spec lays it out."""
        return 8 * -(-self.vector_count // 64)

    def add_capability(self, device: PciDevice, bar: int, table_offset: int, pba_offset: int):
        """Chain the MSI-X capability into `device`'s list (table and PBA in BAR `bar`)."""
        if table_offset % 8 or pba_offset % 8 or not 0 <= bar < 6:
            raise ValueError("MSI-X table and PBA need 8-byte aligned offsets in BAR 0-5")
        control = self.vector_count - 1
        body = (
            control.to_bytes(2, "little")
            + (table_offset | bar).to_bytes(4, "little")
            + (pba_offset | bar).to_bytes(4, "little")
        )
        mask = (CONTROL_ENABLE | CONTROL_FUNCTION_MASK).to_bytes(2, "little") + bytes(8)
        self._device = device
        self.capability_offset = device.add_capability(
            MSIX_CAPABILITY_ID, body, mask, self._capability_written
        )
        return self.capability_offset

    def _capability_written(self, offset: int, size: int, value: int) -> None:
        if offset + size <= MESSAGE_CONTROL or offset >= MESSAGE_CONTROL + 2:
            return
        assert self._device is not None and self.capability_offset is not None
        control = self._device.config.get(self.capability_offset + MESSAGE_CONTROL, 2)
        with self._lock, self.controller.batch():
            was_masked = [self._masked(index) for index in range(self.vector_count)]
            self.enabled = bool(control & CONTROL_ENABLE)
            self.function_masked = bool(control & CONTROL_FUNCTION_MASK)
            for index in range(self.vector_count):
                if self._masked(index) != was_masked[index]:
                    self._publish(index)

    # Table and PBA registers (at offsets relative to their start) -------------------------

    def table_read(self, offset: int, size: int) -> int:
        if not 0 <= offset <= self.table_size - size:
            return 0
        with self._lock:
            return int.from_bytes(self.table[offset : offset + size], "little")

    def table_write(self, offset: int, size: int, value: int) -> None:
        if not 0 <= offset <= self.table_size - size:
            return
        index = offset // ENTRY_SIZE
        if (offset + size - 1) // ENTRY_SIZE != index:
            return
        with self._lock:
            before = bytes(self.table[offset : offset + size])
            self.table[offset : offset + size] = value.to_bytes(size, "little")
            entry = ENTRY_SIZE * index
            # Only bit 0 of vector control is defined; the rest reads as zero.
            self.table[entry + 12] &= VECTOR_CONTROL_MASKED
            self.table[entry + 13 : entry + 16] = bytes(3)
            if bytes(self.table[offset : offset + size]) != before:
                self._publish(index)

    def pba_read(self, offset: int, size: int) -> int:
        if not 0 <= offset <= self.pba_size - size:
            return 0
        with self._lock:
            bits = sum(1 << index for index, pending in enumerate(self.pending) if pending)
        return (bits >> (8 * offset)) & ((1 << (8 * size)) - 1)

    def pba_write(self, offset: int, size: int, value: int) -> None:
        """The pending bits are read-only."""

    # Signalling ---------------------------------------------------------------------------

    def signal(self, index: int) -> bool:
        """Send vector `index` (or make it pending); False when there is no such vector."""
        if not 0 <= index < self.vector_count:
            return False
        with self._lock:
            if self._masked(index):
                self.pending[index] = True
                return True
            self.fired[index] += 1
            vector = self.vectors[index]
        vector.fire()
        return True

    def message(self, index: int) -> tuple[int, int]:
        """(address, data) of entry `index` as the guest programmed it."""
        entry = ENTRY_SIZE * index
        table = self.table
        address = int.from_bytes(table[entry : entry + 8], "little")
        return address, int.from_bytes(table[entry + 8 : entry + 12], "little")

    def unmasked(self, index: int) -> MsiVector | None:
        """Vector `index`'s delivery object while the guest lets it fire (MSI-X on, neither
        the function nor the entry masked); None otherwise, or for no such vector."""
        if not 0 <= index < self.vector_count:
            return None
        with self._lock:
            return None if self._masked(index) else self.vectors[index]

    def _entry_masked(self, index: int) -> bool:
        return bool(self.table[ENTRY_SIZE * index + 12] & VECTOR_CONTROL_MASKED)

    def _masked(self, index: int) -> bool:
        return not self.enabled or self.function_masked or self._entry_masked(index)

    def _publish(self, index: int) -> None:
        """Tell the controller about entry `index`; deliver it if it was pending (lock held)."""
        address, data = self.message(index)
        masked = self._masked(index)
        vector = self.vectors[index]
        vector.update(address, data, masked)
        if not masked and self.pending[index]:
            self.pending[index] = False
            self.fired[index] += 1
            vector.fire()
