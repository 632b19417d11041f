"""Address spaces: a region tree, its published flat view, and the dispatcher.

`read`/`write` are the vCPU run loop's hot path. The common case (an aligned access of a width
the handler implements, no byte swap, inside one range) costs one lookup (the view's address
memo, else its page index, else `entry_for`), one tuple unpack, one lock and one handler call;
everything else (splitting, widening, byte swapping, straddling, unassigned addresses, invalid
widths) takes `_access`, the general path. A handler that raises is counted, never
propagated: the access reads all-ones or is dropped; the first failures of a region are logged
with their traceback, later ones only counted (a guest can hit a device bug in a loop).

After each rebuild, each listener gets the difference between the new view and what it has
accepted so far: RAM sections and event notifiers removed, then added. A listener that raises
(KVM refusing a slot or an ioeventfd) has refused that one change: the rest still goes to it,
the refusal is counted and logged, and the refused change is offered again at every later
rebuild, so the listener converges on the view instead of drifting from it. A listener added
late gets the current state as adds.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from typing import Protocol

from kvmlet.bus import transactions
from kvmlet.bus.access import read_region, write_region
from kvmlet.bus.flat import MEMO_LIMIT, FlatView, IoEventNotifier, MemorySection
from kvmlet.bus.region import ContainerRegion, Region
from kvmlet.errors import LazyLogger, RateLimitedLog

log = LazyLogger("kvmlet.bus")
_handler_log = RateLimitedLog(log)
_listener_log = RateLimitedLog(log)

PORT_IO_SIZE = 1 << 16
MMIO_SIZE = 1 << 64
MAX_TRACKED_ADDRESSES = 4096
"""Distinct unassigned addresses counted one by one; past this only totals grow."""

_MASKS = tuple((1 << (8 * size)) - 1 for size in range(9))

TraceHook = Callable[[str, int, int, bool, int, str | None], None]
"""(space_name, address, size, is_write, value, region_name or None when unassigned)."""


class MemoryListener(Protocol):
    """What the KVM layer implements to keep memory slots and ioeventfds in step."""

    def region_added(self, section: MemorySection) -> None: ...

    def region_removed(self, section: MemorySection) -> None: ...

    def eventfd_added(self, notifier: IoEventNotifier) -> None: ...

    def eventfd_removed(self, notifier: IoEventNotifier) -> None: ...


class AddressSpace:
    """Port I/O (`port_io=True`, 64 KiB) or MMIO (2**64 bytes) as the guest sees it."""

    def __init__(self, name: str, size: int, *, port_io: bool = False):
        self.name = name
        self.size = size
        self.port_io = port_io
        self.root = ContainerRegion(name, size)
        self.root.spaces.append(self)
        self.listeners: list[MemoryListener] = []
        self.trace: TraceHook | None = None
        self._trace_hooks: tuple[TraceHook, ...] = ()
        self.unassigned_reads: dict[int, int] = {}
        self.unassigned_writes: dict[int, int] = {}
        self.unassigned_total = 0
        self.invalid_accesses = 0
        self.handler_errors = 0
        self.listener_errors = 0
        self.rebuilds = 0
        self._view = FlatView(name, port_io, self.root, size)
        # Per listener: the sections and notifiers it has accepted.
        self._accepted: dict[int, tuple[set[MemorySection], set[IoEventNotifier]]] = {}

    def __repr__(self) -> str:
        return f"<AddressSpace {self.name!r} size={self.size:#x}>"

    @property
    def view(self) -> FlatView:
        """The current flat view (immutable; replaced whole on each rebuild)."""
        return self._view

    def transaction(self) -> AbstractContextManager[None]:
        """Batch tree changes (of any address space) into one rebuild each."""
        return transactions.transaction()

    def rebuild(self) -> None:
        """Re-render the flat view, publish it, and tell listeners what changed."""
        with transactions.lock:
            new = FlatView(self.name, self.port_io, self.root, self.size)
            self._view = new
            self.rebuilds += 1
            for listener in list(self.listeners):
                self._commit(listener, new)

    def _commit(self, listener: MemoryListener, view: FlatView) -> None:
        """Bring `listener` from what it accepted to `view`: removals first, then additions;
        each change it refuses stays pending for the next commit."""
        sections, notifiers = self._accepted[id(listener)]
        if sections == view.sections and notifiers == view.notifiers:
            return
        steps = (
            (
                listener.eventfd_removed,
                notifiers,
                sorted(notifiers - view.notifiers, key=_notifier_key),
                False,
            ),
            (
                listener.region_removed,
                sections,
                sorted(sections - view.sections, key=_section_key),
                False,
            ),
            (
                listener.region_added,
                sections,
                sorted(view.sections - sections, key=_section_key),
                True,
            ),
            (
                listener.eventfd_added,
                notifiers,
                sorted(view.notifiers - notifiers, key=_notifier_key),
                True,
            ),
        )
        for call, accepted, changes, adding in steps:
            for change in changes:
                try:
                    call(change)
                except Exception:
                    self._listener_refused(listener, call.__name__, change)
                    continue
                if adding:
                    accepted.add(change)
                else:
                    accepted.discard(change)

    def _listener_refused(self, listener: object, what: str, change: object) -> None:
        self.listener_errors += 1
        _listener_log.warning(
            (self.name, what),
            "%s: %s refused %s of %r (offered again at the next change)",
            self.name,
            type(listener).__name__,
            what,
            change,
            exc_info=True,
        )

    def add_listener(self, listener: MemoryListener) -> None:
        """Register `listener` and replay the current sections and notifiers to it as adds."""
        with transactions.lock:
            self.listeners.append(listener)
            self._accepted[id(listener)] = (set(), set())
            self._commit(listener, self._view)

    def remove_listener(self, listener: MemoryListener) -> None:
        with transactions.lock:
            self.listeners.remove(listener)
            del self._accepted[id(listener)]

    def add_trace(self, hook: TraceHook) -> None:
        """Call `hook` on every access, beside the hooks already added (`remove_trace` takes
        it away). `trace` is set to the one hook, or to a fan-out of several, or None."""
        with transactions.lock:
            self._trace_hooks = (*self._trace_hooks, hook)
            self._publish_trace()

    def remove_trace(self, hook: TraceHook) -> None:
        """Take `hook` away (compared by equality: a bound method is a new object each time)."""
        with transactions.lock:
            self._trace_hooks = tuple(other for other in self._trace_hooks if other != hook)
            self._publish_trace()

    def _publish_trace(self) -> None:
        hooks = self._trace_hooks
        if len(hooks) > 1:

            def fan_out(*access) -> None:
                for hook in hooks:
                    hook(*access)

            self.trace = fan_out
        else:
            self.trace = hooks[0] if hooks else None

    def read(self, address: int, size: int) -> int:
        """Guest read of `size` bytes at `address`, as a little-endian int."""
        view = self._view
        entry = view.memo.get(address)
        if entry is None:
            entry = view.page_entry(address >> view.page_shift)
            if entry is None:
                entry = view.entry_for(address)
            elif len(view.memo) < MEMO_LIMIT:
                view.memo[address] = entry
        end, delta, direct, lock, read, _, region = entry
        offset = address - delta
        if address + size <= end and size in direct and not offset & (size - 1):
            try:
                if lock is None:
                    value = read(offset, size) & _MASKS[size]
                    region.reads += 1
                    region.bytes_read += size
                else:
                    lock.acquire()  # not `with`: half the cost on this hot path
                    try:
                        value = read(offset, size) & _MASKS[size]
                        region.reads += 1
                        region.bytes_read += size
                    finally:
                        lock.release()
            except Exception:
                self._handler_failed(region, address, size, False)
                return _MASKS[size]
            if self.trace is not None:
                self.trace(self.name, address, size, False, value, region.name)
            return value
        return self._access(address, size, 0, False)

    def write(self, address: int, size: int, value: int) -> None:
        """Guest write of `size` bytes (little-endian `value`) at `address`."""
        view = self._view
        entry = view.memo.get(address)
        if entry is None:
            entry = view.page_entry(address >> view.page_shift)
            if entry is None:
                entry = view.entry_for(address)
            elif len(view.memo) < MEMO_LIMIT:
                view.memo[address] = entry
        end, delta, direct, lock, _, write, region = entry
        offset = address - delta
        if address + size <= end and size in direct and not offset & (size - 1):
            value &= _MASKS[size]
            try:
                if lock is None:
                    write(offset, size, value)
                    region.writes += 1
                    region.bytes_written += size
                else:
                    lock.acquire()  # not `with`: half the cost on this hot path
                    try:
                        write(offset, size, value)
                        region.writes += 1
                        region.bytes_written += size
                    finally:
                        lock.release()
            except Exception:
                self._handler_failed(region, address, size, True)
                return
            if self.trace is not None:
                self.trace(self.name, address, size, True, value, region.name)
            return
        self._access(address, size, value, True)

    def _access(self, address: int, size: int, value: int, is_write: bool) -> int:
        """The general path: any width, alignment, byte order, straddle or gap."""
        if not 1 <= size <= 8:
            raise ValueError(f"{self.name}: access width {size} is not 1-8 bytes")
        value &= _MASKS[size]
        view = self._view
        pieces = []
        position, end = address, address + size
        while position < end:
            flat = view.range_at(position)
            piece_end = min(end, flat[1])
            pieces.append((position, piece_end - position, flat[2], flat[3] + position - flat[0]))
            position = piece_end
        first_region, first_offset = pieces[0][2], pieces[0][3]
        valid = first_region is None or first_region.valid.permits(first_offset, size)
        if not valid:
            self.invalid_accesses += 1
            log.debug("%s: invalid %d-byte access at %#x", self.name, size, address)
        result = 0
        for position, length, region, offset in pieces:
            shift = 8 * (position - address)
            if region is None or not valid:
                self._count_unassigned(position, is_write)
                result |= _MASKS[length] << shift
                continue
            guard = region.lock or nullcontext()
            try:
                with guard:
                    if is_write:
                        write_region(region, offset, length, value >> shift & _MASKS[length])
                        region.writes += 1
                        region.bytes_written += length
                    else:
                        result |= read_region(region, offset, length) << shift
                        region.reads += 1
                        region.bytes_read += length
            except Exception:
                self._handler_failed(region, position, length, is_write)
                result |= _MASKS[length] << shift
        if is_write:
            result = value
        if self.trace is not None:
            name = first_region.name if first_region is not None and valid else None
            self.trace(self.name, address, size, is_write, result, name)
        return result

    def _count_unassigned(self, address: int, is_write: bool) -> None:
        self.unassigned_total += 1
        counts = self.unassigned_writes if is_write else self.unassigned_reads
        if address in counts:
            counts[address] += 1
        elif len(counts) < MAX_TRACKED_ADDRESSES:
            counts[address] = 1
            log.debug(
                "%s: unassigned %s at %#x", self.name, "write" if is_write else "read", address
            )

    def _handler_failed(self, region: Region, address: int, size: int, is_write: bool) -> None:
        self.handler_errors += 1
        _handler_log.error(
            (self.name, region.name),
            "%s: handler of %r failed on %d-byte %s at %#x",
            self.name,
            region.name,
            size,
            "write" if is_write else "read",
            address,
            exc_info=True,
        )

    def regions(self) -> Iterator[Region]:
        """Every region of the tree (placed or disabled), depth first."""
        pending = [self.root]
        while pending:
            region = pending.pop()
            yield region
            pending.extend(reversed(region.subregions))

    def describe(self) -> str:
        """The tree (like QEMU's `info mtree`), then the flat view, one line per node/range."""
        lines = [f"address space {self.name!r} ({self.size:#x} bytes):"]

        def walk(region: Region, base: int, depth: int) -> None:
            state = "" if region.enabled else " [disabled]"
            lines.append(
                f"{'  ' * depth}{base:#012x}-{base + region.size - 1:#012x} "
                f"(prio {region.priority}, {type(region).__name__}): {region.name}{state}"
            )
            for child in region.subregions:
                walk(child, base + child.offset, depth + 1)

        walk(self.root, 0, 1)
        lines.append("flat view:")
        for flat in self._view.assigned():
            lines.append(
                f"  {flat.start:#012x}-{flat.end - 1:#012x} {flat.region.name} +{flat.offset:#x}"
            )
        return "\n".join(lines)

    def stats(self) -> dict:
        """Per-region access counters (regions with traffic) and unassigned/invalid counts."""
        return {
            "regions": {
                region.name: region.counters()
                for region in self.regions()
                if region.reads or region.writes
            },
            "unassigned_total": self.unassigned_total,
            "unassigned_reads": dict(self.unassigned_reads),
            "unassigned_writes": dict(self.unassigned_writes),
            "invalid_accesses": self.invalid_accesses,
            "handler_errors": self.handler_errors,
            "listener_errors": self.listener_errors,
        }


def _section_key(section: MemorySection) -> tuple[int, int]:
    return section.start, section.size


def _notifier_key(notifier: IoEventNotifier) -> tuple[int, int, int]:
    datamatch = -1 if notifier.datamatch is None else notifier.datamatch
    return notifier.address, notifier.size, datamatch


def port_io_space(name: str = "io") -> AddressSpace:
    """The 64 KiB x86 port I/O space."""
    return AddressSpace(name, PORT_IO_SIZE, port_io=True)


def mmio_space(name: str = "memory") -> AddressSpace:
    """The 64-bit guest-physical (MMIO and RAM) space."""
    return AddressSpace(name, MMIO_SIZE)
