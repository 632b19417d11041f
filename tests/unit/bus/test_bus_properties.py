"""Property tests: the flat view always agrees with a naive walk of the region tree.

The naive walk decides overlaps from the test's own record of priorities and insertion order,
not from the implementation's sorted subregion lists.
"""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from kvmlet.bus import AddressSpace, ContainerRegion, IoRegion, RamRegion, Region
from kvmlet.bus.flat import FlatView

SPACE_SIZE = 0x400


class Null:
    def read(self, offset, size):
        return 0

    def write(self, offset, size, value):
        pass


class TreeModel:
    """Builds a tree and remembers (priority, insertion number) of each placement."""

    def __init__(self, space: AddressSpace) -> None:
        self.space = space
        self.rank: dict[Region, tuple[int, int]] = {}
        self.counter = itertools.count()

    def add(self, parent: Region, offset: int, region: Region, priority: int) -> None:
        parent.add_subregion(offset, region, priority)
        self.rank[region] = (priority, next(self.counter))

    def naive_lookup(self, address: int) -> tuple[Region, int] | None:
        def find(region: Region, base: int) -> tuple[Region, int] | None:
            if not base <= address < base + region.size:
                return None
            children = sorted(region.subregions, key=lambda child: self.rank[child], reverse=True)
            for child in children:
                if child.enabled:
                    found = find(child, base + child.offset)
                    if found is not None:
                        return found
            return (region, address - base) if region.is_leaf else None

        if not 0 <= address < self.space.size:
            return None
        return find(self.space.root, 0)

    def boundaries(self) -> set[int]:
        points = {0, self.space.size - 1}
        for region in self.space.regions():
            start = region.absolute_offset()
            points.update({start - 1, start, start + region.size - 1, start + region.size})
        return {point for point in points if 0 <= point < self.space.size + 2}


def assert_matches(model: TreeModel, view: FlatView, probes: set[int]) -> None:
    ranges = view.ranges
    for before, after in itertools.pairwise(ranges):
        assert before.start < before.end == after.start
    for address in probes:
        flat = view.lookup(address)
        expected = model.naive_lookup(address)
        actual = None if flat.region is None else (flat.region, flat.offset + address - flat.start)
        assert actual == expected, hex(address)


placement = st.tuples(
    st.sampled_from(["container", "io", "ram"]),
    st.integers(0, 20),  # parent choice
    st.integers(0, SPACE_SIZE),  # offset
    st.integers(1, 0x180),  # size
    st.integers(-2, 2),  # priority
)
mutation = st.tuples(
    st.sampled_from(["move", "toggle", "remove"]),
    st.integers(0, 40),
    st.integers(0, SPACE_SIZE),
)


@settings(max_examples=150, deadline=None)
@given(
    placements=st.lists(placement, min_size=1, max_size=16),
    mutations=st.lists(mutation, max_size=10),
    extra_probes=st.lists(st.integers(0, SPACE_SIZE - 1), max_size=20),
)
def test_flat_view_equals_naive_walk(placements, mutations, extra_probes):
    space = AddressSpace("t", SPACE_SIZE)
    model = TreeModel(space)
    containers: list[Region] = [space.root]
    placed: list[Region] = []
    for index, (kind, parent_choice, offset, size, priority) in enumerate(placements):
        if kind == "container":
            region: Region = ContainerRegion(f"c{index}", size)
        elif kind == "io":
            region = IoRegion(f"io{index}", size, Null())
        else:
            region = RamRegion(f"ram{index}", size, bytearray(size))
        parent = containers[parent_choice % len(containers)]
        model.add(parent, offset, region, priority)
        placed.append(region)
        if kind != "ram":
            containers.append(region)
    assert_matches(model, space.view, model.boundaries() | set(extra_probes))
    for action, choice, offset in mutations:
        region = placed[choice % len(placed)]
        if region.parent is None:
            continue
        if action == "move":
            region.move(offset)
        elif action == "toggle":
            region.set_enabled(not region.enabled)
        else:
            region.parent.remove_subregion(region)
        assert_matches(model, space.view, model.boundaries() | set(extra_probes))
    for section in space.view.sections:
        flat = space.view.lookup(section.start)
        assert flat.region is section.region and section.end <= flat.end
