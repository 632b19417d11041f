"""Rendering a region tree into a flat view: sorted, non-overlapping ranges for bisection.

The tree is walked winners first (at each level: higher priority, then later insertion; a
region's subregions before the region itself) and each leaf "paints" the parts of its extent,
clipped to every enclosing container, that nothing painted before covers. The result is a list
of `FlatRange`s that tile the address space exactly, with gaps filled by unassigned ranges
(region None), so a lookup always lands on a range.

The view also carries what listeners need: RAM/ROM sections and the visible event notifiers,
as immutable, hashable values so that a rebuild's difference is a pair of set differences.
These records are NamedTuples and small classes rather than frozen dataclasses, which are
costly to build at import, on every boot (docs/performance.md, "Boot").
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from operator import attrgetter, gt
from typing import Any, NamedTuple

from kvmlet.bus.region import RamRegion, Region

UNASSIGNED_END = 1 << 66
"""End of the last unassigned range: past any address the guest can produce."""
UNASSIGNED_START = -(1 << 66)
"""Start of the first unassigned range, so negative addresses still land on a range."""
MEMO_LIMIT = 4096
"""Addresses a view remembers; guests use few register addresses, so this bounds a hostile
guest's probing without costing a well-behaved one a lookup per access."""
PAGE_SHIFT = 12
"""MMIO pages are 4 KiB; in the port I/O space every port is a page of its own (shift 0)."""
INDEXED_RANGE_LIMIT = 1 << 16
"""Ranges up to this size (device registers) have their pages in the view's page index;
larger ones (RAM, the gaps between devices) are found through the memo and by bisection."""
PAGE_INDEX_LIMIT = 1 << 14
"""Pages one view indexes at most (bounds its memory and the rebuild's time)."""


class FlatRange(NamedTuple):
    """[start, end) of the address space shows `region` (None: unassigned) from `offset`."""

    start: int
    end: int
    region: Region | None
    offset: int


class _KeyedRecord:
    """A slotted record compared and hashed by the attributes `_key` names: a value for set
    differences, with room for a field that must stay out of equality."""

    __slots__ = ()
    _key: attrgetter

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return self._key(self) == self._key(other)

    def __hash__(self) -> int:
        return hash(self._key(self))

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={self._field_repr(name)}" for name in self.__slots__)
        return f"{type(self).__name__}({fields})"

    def _field_repr(self, name: str) -> str:
        value = getattr(self, name)
        if name == "backing":  # guest RAM: its type and size, not its bytes
            size = len(value) if hasattr(value, "__len__") else "?"
            return f"<{type(value).__name__} of {size}>"
        return repr(value)


class MemorySection(_KeyedRecord):
    """A visible piece of a RAM/ROM region, for the KVM layer's memory slots.

    Equal (and hashed) by everything but `backing`, which may be an unhashable buffer."""

    __slots__ = (
        "address_space",
        "backing",
        "backing_offset",
        "readonly",
        "region",
        "region_offset",
        "size",
        "start",
    )
    _key = attrgetter(
        "address_space", "start", "size", "region", "region_offset", "readonly", "backing_offset"
    )

    def __init__(
        self,
        address_space: str,
        start: int,
        size: int,
        region: RamRegion,
        region_offset: int,
        readonly: bool,
        backing: Any,
        backing_offset: int = 0,
    ):
        self.address_space = address_space
        self.start = start
        self.size = size
        self.region = region
        self.region_offset = region_offset
        self.readonly = readonly
        self.backing = backing
        self.backing_offset = backing_offset

    @property
    def end(self) -> int:
        return self.start + self.size


class IoEventNotifier(_KeyedRecord):
    """A visible doorbell, for the KVM layer's ioeventfds (KVM_IOEVENTFD_FLAG_PIO if port_io).

    Equal (and hashed) by everything but `region_name`, which only names it in messages."""

    __slots__ = (
        "address",
        "address_space",
        "datamatch",
        "eventfd",
        "port_io",
        "region_name",
        "size",
    )
    _key = attrgetter("address_space", "port_io", "address", "size", "datamatch", "eventfd")

    def __init__(
        self,
        address_space: str,
        port_io: bool,
        address: int,
        size: int,
        datamatch: int | None,
        eventfd: Any,
        region_name: str = "",
    ):
        self.address_space = address_space
        self.port_io = port_io
        self.address = address
        self.size = size
        self.datamatch = datamatch
        self.eventfd = eventfd
        self.region_name = region_name


class _Painter:
    """Collects flat ranges, each claiming only what earlier (winning) ranges left free."""

    def __init__(self) -> None:
        self.covered_starts: list[int] = []
        self.covered_ends: list[int] = []
        self.ranges: list[tuple[int, int, Region, int]] = []

    def paint(self, start: int, end: int, region: Region, region_base: int) -> None:
        starts, ends = self.covered_starts, self.covered_ends
        index = bisect_right(ends, start)
        cursor = start
        while index < len(starts) and starts[index] < end:
            if starts[index] > cursor:
                self.ranges.append((cursor, starts[index], region, cursor - region_base))
            cursor = max(cursor, ends[index])
            index += 1
        if cursor < end:
            self.ranges.append((cursor, end, region, cursor - region_base))
        first = bisect_left(ends, start)
        last = bisect_right(starts, end)
        if first < last:
            start = min(start, starts[first])
            end = max(end, ends[last - 1])
        starts[first:last] = [start]
        ends[first:last] = [end]


def _visible_leaves(root: Region, size: int) -> tuple[list[tuple], list[tuple[Region, int]]]:
    """Leaves as (low, high, region, base), clipped to their containers, winners first; and
    (region, base) of the visible regions that declare event notifiers."""
    leaves: list[tuple] = []
    with_notifiers: list[tuple[Region, int]] = []

    def visit(region: Region, base: int, low: int, high: int) -> None:
        low = max(low, base)
        high = min(high, base + region.size)
        if low >= high:
            return
        if region.eventfds:
            with_notifiers.append((region, base))
        for child in region.subregions:
            if child.enabled:
                visit(child, base + child.offset, low, high)
        if region.is_leaf:
            leaves.append((low, high, region, base))

    visit(root, 0, 0, size)
    return leaves, with_notifiers


def render(root: Region, size: int) -> tuple[list[tuple], list[tuple[Region, int]]]:
    """Visible pieces as sorted (start, end, region, offset) tuples, without gaps; and the
    (region, base) of visible regions with event notifiers.

    When no two visible leaves overlap (the usual case) the leaves are the answer; otherwise
    they are painted winners first."""
    leaves, with_notifiers = _visible_leaves(root, size)
    ordered = sorted(leaves, key=_first)
    lows = [leaf[0] for leaf in ordered]
    highs = [leaf[1] for leaf in ordered]
    if any(map(gt, highs, lows[1:])):
        painter = _Painter()
        for low, high, region, base in leaves:
            painter.paint(low, high, region, base)
        return sorted(painter.ranges, key=_first), with_notifiers
    return [(low, high, region, low - base) for low, high, region, base in ordered], with_notifiers


def _first(item: tuple) -> int:
    return item[0]


_UNASSIGNED_PLAN = (frozenset(), None, None, None, None)


class FlatView:
    """An immutable rendering of one address space; published by a single reference swap.

    `starts` and `entries` serve the dispatcher: entry i is (end, start - offset, direct
    widths, lock, read, write, region) for the range beginning at starts[i]. `memo` maps
    addresses already looked up to their entry; the view never changes, so neither do they.
    The page index covers the pages small ranges touch (4 KiB in MMIO, single ports in port
    I/O): `page_entry(address >> page_shift)` gives, for a page holding one assigned range
    that starts at or before the page, that range's entry (the dispatcher's second try, after
    the memo: device registers start their page); `_shared_pages` maps a page several assigned
    ranges share to their starts and entries. The index is built by the view's first
    `entry_for`, not at the rebuild: most rebuilds (a guest sizing BARs) are followed by other
    rebuilds before any access."""

    __slots__ = (
        "_ranges",
        "_shared_pages",
        "entries",
        "memo",
        "notifiers",
        "page_entry",
        "page_shift",
        "pages",
        "sections",
        "starts",
    )

    def __init__(self, name: str, port_io: bool, root: Region, size: int):
        painted, with_notifiers = render(root, size)
        ranges: list[tuple] = []
        entries: list[tuple] = []
        ram_regions = set()
        cursor = UNASSIGNED_START
        for flat in painted:
            start, end, region, offset = flat
            if start > cursor:
                ranges.append((cursor, start, None, 0))
                entries.append((start, cursor, *_UNASSIGNED_PLAN))
            ranges.append(flat)
            entries.append((end, start - offset, *region.dispatch_plan))
            if region.is_ram:
                ram_regions.add(region)
            cursor = end
        ranges.append((cursor, UNASSIGNED_END, None, 0))
        entries.append((UNASSIGNED_END, cursor, *_UNASSIGNED_PLAN))
        self._ranges = ranges
        self.starts = [flat[0] for flat in ranges]
        self.entries = entries
        self.memo: dict[int, tuple] = {}
        self.pages: dict[int, tuple] = {}
        self.page_entry = self.pages.get
        self.page_shift = 0 if port_io else PAGE_SHIFT
        self._shared_pages: dict[int, list] | None = None
        self.sections = frozenset(_ram_sections(name, ranges, ram_regions))
        notifiers = set()
        for region, base in with_notifiers:
            for notifier in region.eventfds:
                address = base + notifier.offset
                flat = self.lookup(address)
                if flat.region is region and address + notifier.size <= flat.end:
                    notifiers.add(
                        IoEventNotifier(
                            name,
                            port_io,
                            address,
                            notifier.size,
                            notifier.datamatch,
                            notifier.eventfd,
                            region.name,
                        )
                    )
        self.notifiers = frozenset(notifiers)

    def entry_for(self, address: int) -> tuple:
        """The dispatch entry covering `address`: from the page index, or by bisection (then
        remembered in `memo`, the dispatcher's first try, while it holds fewer than MEMO_LIMIT
        addresses)."""
        shared_pages = self._shared_pages
        if shared_pages is None:  # two threads may both build it: the same index either way
            shared_pages = self._shared_pages = _index_pages(
                self._ranges, self.starts, self.entries, self.pages, self.page_shift
            )
        page = address >> self.page_shift
        entry = self.pages.get(page)
        if entry is not None and address < entry[0]:
            return entry
        shared = shared_pages.get(page)
        if shared is None:
            entry = self.entries[bisect_right(self.starts, address) - 1]
        else:
            starts, entries = shared
            entry = entries[bisect_right(starts, address) - 1]
        if len(self.memo) < MEMO_LIMIT:
            self.memo[address] = entry
        return entry

    def lookup(self, address: int) -> FlatRange:
        """The flat range containing `address`."""
        return FlatRange(*self.range_at(address))

    def range_at(self, address: int) -> tuple[int, int, Region | None, int]:
        """The flat range containing `address` as a plain (start, end, region, offset) tuple."""
        return self._ranges[bisect_right(self.starts, address) - 1]

    @property
    def ranges(self) -> list[FlatRange]:
        """Every range, unassigned gaps included, sorted by start."""
        return [FlatRange(*flat) for flat in self._ranges]

    def assigned(self) -> list[FlatRange]:
        """The ranges that show a region (gaps left out)."""
        return [FlatRange(*flat) for flat in self._ranges if flat[2] is not None]


def _index_pages(
    ranges: list[tuple],
    starts: list[int],
    entries: list[tuple],
    pages: dict[int, tuple],
    shift: int,
) -> dict[int, list]:
    """Fill `pages` for the pages that ranges of at most INDEXED_RANGE_LIMIT bytes touch, and
    return the shared pages (page number -> [starts, entries]).

    A page maps to the entry of the range holding its first byte when no other assigned range
    touches it: every access in the page starts at or after that range's start, so the
    dispatcher's fast path is right for it, and an access past its end (unassigned space)
    fails the fast path's end check and takes the general path. A page several assigned
    ranges share is bisected over its own few ranges instead."""
    mask = (1 << shift) - 1
    touched = set()
    for index, (start, end, region, _) in enumerate(ranges):
        if region is None or end - start > INDEXED_RANGE_LIMIT:
            continue
        first, last = -(-start >> shift), end >> shift  # the pages wholly inside
        if last - first == 1:
            pages[first] = entries[index]
        elif first < last:
            pages.update(dict.fromkeys(range(first, last), entries[index]))
        if start & mask:
            touched.add(start >> shift)
        if end & mask:
            touched.add(end >> shift)
        if len(pages) + len(touched) >= PAGE_INDEX_LIMIT:
            break
    shared: dict[int, list] = {}
    for page in touched:
        base = page << shift
        low = bisect_right(starts, base) - 1
        high = bisect_left(starts, base + mask + 1)
        assigned = [index for index in range(low, high) if ranges[index][2] is not None]
        if assigned == [low]:
            pages[page] = entries[low]
        else:
            shared[page] = [starts[low:high], entries[low:high]]
    return shared


def _ram_sections(name: str, ranges: list[tuple], ram: set[Region]) -> list[MemorySection]:
    if not ram:
        return []
    return [
        MemorySection(
            name,
            start,
            end - start,
            region,
            offset,
            region.readonly,
            region.backing,
            region.backing_offset + offset,
        )
        for start, end, region, offset in ranges
        if region in ram
    ]


__all__ = ["FlatRange", "FlatView", "IoEventNotifier", "MemorySection", "render"]
