"""Property tests: the flat view always agrees with a naive walk of the region tree.

The naive walk decides overlaps from the test's own record of priorities and insertion order,
not from the implementation's sorted subregion lists or insertion numbers.
"""

from __future__ import annotations

import itertools

from bus_oracle import assert_view_matches_tree
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmlet.bus import AddressSpace, ContainerRegion, IoRegion, RamRegion, Region

SPACE_SIZE = 0x400


class Null:
    def read(self, offset, size):
        return 0

    def write(self, offset, size, value):
        pass


class Ranks:
    """The test's own record of (priority, insertion number) for each placement."""

    def __init__(self) -> None:
        self.rank: dict[Region, tuple[int, int]] = {}
        self.counter = itertools.count()

    def add(self, parent: Region, offset: int, region: Region, priority: int) -> None:
        parent.add_subregion(offset, region, priority)
        self.rank[region] = (priority, next(self.counter))

    def __call__(self, region: Region) -> tuple[int, int]:
        return self.rank[region]


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
    ranks = Ranks()
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
        ranks.add(parent, offset, region, priority)
        placed.append(region)
        if kind != "ram":
            containers.append(region)
    assert_view_matches_tree(space, set(extra_probes), ranks)
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
        assert_view_matches_tree(space, set(extra_probes), ranks)
    for section in space.view.sections:
        flat = space.view.lookup(section.start)
        assert flat.region is section.region and section.end <= flat.end
