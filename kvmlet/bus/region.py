"""Regions: the nodes of the bus tree (containers, device I/O regions, RAM/ROM).

A region has a name, a size and, once placed, an offset inside its parent container and a
priority. Any region can hold subregions; a `ContainerRegion` is transparent where it has no
subregion, an `IoRegion` (a device's registers) or `RamRegion` (host memory) shows itself
beneath its subregions. Every change to a placed region (add, remove, move, enable, disable,
event notifiers, read-only flag) marks the address spaces above it dirty; they re-render their
flat view at the end of the outermost `transaction()`, or at once outside one.
"""

from __future__ import annotations

import enum
import itertools
import mmap
import sys
import threading
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

from kvmlet.bus import transactions
from kvmlet.memory import RamBank

if TYPE_CHECKING:
    from kvmlet.bus.address_space import AddressSpace


class DeviceOps(Protocol):
    """What a device model gives the bus: register reads and writes at region offsets."""

    def read(self, offset: int, size: int) -> int: ...

    def write(self, offset: int, size: int, value: int) -> None: ...


class Endian(enum.Enum):
    """Byte order of a region's registers as seen on the bus."""

    LITTLE = "little"
    BIG = "big"
    NATIVE = "native"

    @property
    def byteorder(self) -> str:
        """'little' or 'big' (NATIVE resolves to the host's order)."""
        return sys.byteorder if self is Endian.NATIVE else self.value


class AccessSizes:
    """A range of access widths (powers of two, 1-8 bytes) and whether unaligned is allowed.

    An immutable value. A plain class with slots: the dispatcher's general path reads these
    fields on every access (slot reads are faster than a NamedTuple's), and a frozen dataclass
    is costly to build at import, on every boot."""

    __slots__ = ("max", "min", "unaligned")

    def __init__(self, min: int = 1, max: int = 4, unaligned: bool = False):
        if min not in (1, 2, 4, 8) or max not in (1, 2, 4, 8) or min > max:
            raise ValueError(f"bad access sizes {min}..{max}")
        object.__setattr__(self, "min", min)
        object.__setattr__(self, "max", max)
        object.__setattr__(self, "unaligned", unaligned)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"AccessSizes is immutable: cannot set {name}")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, AccessSizes):
            return NotImplemented
        return (self.min, self.max, self.unaligned) == (other.min, other.max, other.unaligned)

    def __hash__(self) -> int:
        return hash((self.min, self.max, self.unaligned))

    def __repr__(self) -> str:
        return f"AccessSizes(min={self.min}, max={self.max}, unaligned={self.unaligned})"

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(size for size in (1, 2, 4, 8) if self.min <= size <= self.max)

    def permits(self, offset: int, size: int) -> bool:
        """Whether an access of `size` bytes at region `offset` is within these rules."""
        if not self.min <= size <= self.max:
            return False
        return self.unaligned or offset % size == 0


BYTES_1_TO_4 = AccessSizes(1, 4, False)
"""An `IoRegion`'s default rules: aligned accesses of 1, 2 or 4 bytes."""
_insertion_order = itertools.count()
_yielding_order = itertools.count(-1, -1)
"""Ranks of regions placed with `yielding`: older than every region placed normally, and each
one older than the previous yielding placement."""
_DEFAULT_LOCK: Any = object()


class EventNotifier(NamedTuple):
    """A doorbell declared by a region: `size`-byte writes at `offset` (matching `datamatch`
    unless it is None) signal `eventfd` (an int fd or an object with fileno())."""

    offset: int
    size: int
    eventfd: Any
    datamatch: int | None = None


class Region:
    """A node of the bus tree; see the module docstring for the common behaviour."""

    is_leaf = False
    is_ram = False
    lock: threading.Lock | None = None
    endian = Endian.LITTLE
    valid = AccessSizes(1, 8, True)
    impl = AccessSizes(1, 8, True)

    def __init__(self, name: str, size: int):
        if size <= 0:
            raise ValueError(f"region {name!r}: size must be positive, not {size}")
        self.name = name
        self.size = size
        self.parent: Region | None = None
        self.offset = 0
        self.priority = 0
        self.enabled = True
        self.subregions: list[Region] = []
        self.eventfds: list[EventNotifier] = []
        self.spaces: list[AddressSpace] = []
        self._sequence = 0
        self.reads = 0
        self.writes = 0
        self.bytes_read = 0
        self.bytes_written = 0

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} size={self.size:#x} at +{self.offset:#x}>"

    def add_subregion(
        self, offset: int, region: Region, priority: int = 0, *, yielding: bool = False
    ) -> None:
        """Place `region` at `offset` inside this one. Where placed regions overlap, the higher
        priority wins, then the one added later; a `yielding` placement loses to every sibling
        of its priority already placed (a BAR the guest maps onto another device's)."""
        if region.parent is not None or region.spaces:
            raise ValueError(f"region {region.name!r} is already placed")
        if offset < 0:
            raise ValueError(f"region {region.name!r}: negative offset {offset:#x}")
        with transactions.lock:
            region.parent = self
            region.offset = offset
            region.priority = priority
            region._sequence = next(_yielding_order if yielding else _insertion_order)
            self.subregions.append(region)
            self._sort_subregions()
            self._changed()

    def remove_subregion(self, region: Region) -> None:
        """Take `region` out; returns once no vCPU can still be dispatching to it through an
        old view (at the end of the outermost transaction, or of the caller's hold of the bus
        lock), so its device may be torn down then."""
        if region.parent is not self:
            raise ValueError(f"{region.name!r} is not a subregion of {self.name!r}")
        with transactions.lock:
            self.subregions.remove(region)
            region.parent = None
            self._changed()
            transactions.lock.removals += 1

    @property
    def rank(self) -> int:
        """Where this region stands among siblings of its priority: the higher wins."""
        return self._sequence

    def _sort_subregions(self) -> None:
        self.subregions.sort(key=lambda child: (-child.priority, -child._sequence))

    def move(self, offset: int, *, yielding: bool = False) -> None:
        """Change this region's offset inside its parent; `yielding` ranks it below every
        sibling of its priority from now on, as if placed before all of them."""
        if offset < 0:
            raise ValueError(f"region {self.name!r}: negative offset {offset:#x}")
        with transactions.lock:
            if yielding and self.parent is not None:
                self._sequence = next(_yielding_order)
                self.parent._sort_subregions()
                self._changed()
            if offset != self.offset:
                self.offset = offset
                self._changed()

    def set_enabled(self, enabled: bool) -> None:
        """Show or hide this region (and its subregions) without removing it."""
        with transactions.lock:
            if enabled != self.enabled:
                self.enabled = enabled
                self._changed()

    def enable(self) -> None:
        self.set_enabled(True)

    def disable(self) -> None:
        self.set_enabled(False)

    def add_eventfd(
        self, offset: int, size: int, eventfd: Any, datamatch: int | None = None
    ) -> EventNotifier:
        """Declare a doorbell; listeners learn of it (at its absolute address) while visible."""
        if size not in (1, 2, 4, 8) or not 0 <= offset <= self.size - size:
            raise ValueError(f"region {self.name!r}: bad eventfd {size} bytes at {offset:#x}")
        notifier = EventNotifier(offset, size, eventfd, datamatch)
        with transactions.lock:
            self.eventfds.append(notifier)
            self._changed()
        return notifier

    def remove_eventfd(
        self, offset: int, size: int, eventfd: Any, datamatch: int | None = None
    ) -> None:
        with transactions.lock:
            self.eventfds.remove(EventNotifier(offset, size, eventfd, datamatch))
            self._changed()

    def root(self) -> Region:
        region = self
        while region.parent is not None:
            region = region.parent
        return region

    def absolute_offset(self) -> int:
        """Offset of this region from the start of its tree's root."""
        offset, region = 0, self
        while region.parent is not None:
            offset += region.offset
            region = region.parent
        return offset

    def counters(self) -> dict[str, int]:
        return {
            "reads": self.reads,
            "writes": self.writes,
            "bytes_read": self.bytes_read,
            "bytes_written": self.bytes_written,
        }

    def _make_dispatch_plan(self) -> tuple:
        """What a flat entry caches for the hot path: (direct widths, lock, read, write, self).

        Direct widths are those the dispatcher may hand straight to the handler: valid,
        implemented and needing no byte swap (the dispatcher checks alignment). A region's
        access rules are fixed when it is made, so the plan is computed once."""
        swap = self.endian.byteorder != "little"
        direct = frozenset(
            size
            for size in self.impl.sizes
            if self.valid.min <= size <= self.valid.max and not (swap and size > 1)
        )
        return direct, self.lock, self.handler_read, self.handler_write, self

    def _changed(self) -> None:
        transactions.mark_dirty(self.root().spaces)

    def handler_read(self, offset: int, size: int) -> int:
        raise NotImplementedError

    def handler_write(self, offset: int, size: int, value: int) -> None:
        raise NotImplementedError


class ContainerRegion(Region):
    """A region that only groups subregions: where none is placed, accesses fall through."""


class IoRegion(Region):
    """A device's registers: accesses call `ops.read`/`ops.write` with the widths of `impl`
    and the byte order of `endian`; the guest may use the widths of `valid`.

    `lock` (a fresh `threading.Lock` by default) is held around handler calls; pass a shared
    lock to serialise several regions of one device, or None for lock-free handlers."""

    is_leaf = True

    def __init__(
        self,
        name: str,
        size: int,
        ops: DeviceOps,
        endian: Endian = Endian.LITTLE,
        valid: AccessSizes = BYTES_1_TO_4,
        impl: AccessSizes = BYTES_1_TO_4,
        lock: Any = _DEFAULT_LOCK,
    ):
        super().__init__(name, size)
        self.ops = ops
        self.endian = endian
        self.valid = valid
        self.impl = impl
        self.lock = threading.Lock() if lock is _DEFAULT_LOCK else lock
        self.handler_read = ops.read
        self.handler_write = ops.write
        self.dispatch_plan = self._make_dispatch_plan()


class RamRegion(Region):
    """Guest RAM or ROM backed by host memory: a `RamBank`, an mmap, or a memoryview.

    The KVM layer maps these as memory slots, so the guest reaches them without exits; the
    dispatcher still serves accesses that do exit (writes to a read-only slot, unit tests):
    reads come from the backing, writes land in it unless `readonly`."""

    is_leaf = True
    is_ram = True
    impl = AccessSizes(1, 8, True)

    def __init__(
        self,
        name: str,
        size: int,
        backing: RamBank | mmap.mmap | memoryview | bytearray,
        readonly: bool = False,
        backing_offset: int = 0,
    ):
        super().__init__(name, size)
        mapping = backing.mapping if isinstance(backing, RamBank) else backing
        view = memoryview(mapping).cast("B")
        if backing_offset < 0 or backing_offset + size > len(view):
            raise ValueError(f"RAM region {name!r} does not fit in its backing")
        self.backing = backing
        self.backing_offset = backing_offset
        self.readonly = readonly
        self.view = view[backing_offset : backing_offset + size]
        self.dispatch_plan = self._make_dispatch_plan()

    def set_readonly(self, readonly: bool) -> None:
        with transactions.lock:
            if readonly != self.readonly:
                self.readonly = readonly
                self._changed()

    def handler_read(self, offset: int, size: int) -> int:
        return int.from_bytes(self.view[offset : offset + size], "little")

    def handler_write(self, offset: int, size: int, value: int) -> None:
        if not self.readonly:
            self.view[offset : offset + size] = value.to_bytes(size, "little")
