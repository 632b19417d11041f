"""A naive tree walk: the reference the flat view is checked against in property tests."""

from __future__ import annotations

import itertools
from collections.abc import Callable

from kvmlet.bus import AddressSpace, Region

Rank = Callable[[Region], tuple[int, int]]


def placement_rank(region: Region) -> tuple[int, int]:
    """(priority, insertion number) as the region records them."""
    return region.priority, region._sequence


def naive_lookup(
    space: AddressSpace, address: int, rank: Rank = placement_rank
) -> tuple[Region, int] | None:
    """(region, offset in it) the guest sees at `address`, by walking the tree from the root;
    at each level the sibling with the highest `rank` that answers wins."""

    def find(region: Region, base: int) -> tuple[Region, int] | None:
        if not base <= address < base + region.size:
            return None
        for child in sorted(region.subregions, key=rank, reverse=True):
            if child.enabled:
                found = find(child, base + child.offset)
                if found is not None:
                    return found
        return (region, address - base) if region.is_leaf else None

    if not 0 <= address < space.size:
        return None
    return find(space.root, 0)


def boundaries(space: AddressSpace) -> set[int]:
    """Every address where what the guest sees may change: region edges and their neighbours."""
    points = {0, space.size - 1}
    for region in space.regions():
        start = region.absolute_offset()
        points.update({start - 1, start, start + region.size - 1, start + region.size})
    return {point for point in points if 0 <= point < space.size + 2}


def assert_view_matches_tree(
    space: AddressSpace, probes: set[int] = frozenset(), rank: Rank = placement_rank
) -> None:
    """The flat view tiles the line without overlaps and agrees with the naive walk."""
    ranges = space.view.ranges
    for before, after in itertools.pairwise(ranges):
        assert before.start < before.end == after.start
    for address in boundaries(space) | set(probes):
        flat = space.view.lookup(address)
        actual = None if flat.region is None else (flat.region, flat.offset + address - flat.start)
        assert actual == naive_lookup(space, address, rank), hex(address)
