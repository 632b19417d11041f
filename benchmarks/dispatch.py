"""Bus dispatch benchmark: flat-table lookup, full dispatch and rebuild, against references.

Prints one JSON line per case with `case`, `ranges`, `ns_per_op` (best of several repeats) and,
for lookups, ratios to two references measured in the same run on the same 1,000 random
register addresses: a dict keyed by exact address (the cheapest possible, but it only works for
exact hits) and a linear scan over the ranges (what a naive bus does). `lookup_N` is the
dispatcher's lookup (the view's address memo, its page index, then `entry_for`);
`lookup_cold_N` is the same lookup with the memo emptied before each round, what every first
access to an address costs (the page index answers for device pages, `entry_for` bisects the
rest; either answer goes into the memo); `lookup_bisect_N` is a bisect over all range starts,
the cold lookup before the page index; `page_index_N` is building a view's page index, which
its first lookup pays once.

    python3 benchmarks/dispatch.py [--quick]
"""

from __future__ import annotations

import json
import os
import platform
import random
import sys
import time
from bisect import bisect_right
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kvmlet.bus import (
    AccessSizes,
    AddressSpace,
    ContainerRegion,
    IoRegion,
    RamRegion,
    RecordingListener,
    mmio_space,
    port_io_space,
)
from kvmlet.bus.flat import MEMO_LIMIT, FlatView
from kvmlet.bus.pci import BarAllocator, BarKind, PciDevice, PciHostBridge, PciWindow
from kvmlet.bus.watch import Watch, WatchList
from kvmlet.machine.record import Recorder

BASE = 0xC000_0000
STRIDE = 0x1000
TARGETS = {
    "lookup_1536": 150,
    "lookup_cold_1536": 150,
    "dispatch_plain_read": 1000,
    "rebuild_bar_move_1536": 2_000_000,
}


class Registers:
    """A device doing the least a real one does: return a value, accept a write."""

    def read(self, offset: int, size: int) -> int:
        return offset

    def write(self, offset: int, size: int, value: int) -> None:
        pass


def build_space(ranges: int) -> tuple[AddressSpace, list[IoRegion]]:
    """MMIO space with `ranges` back-to-back 4 KiB device regions (as an allocator packs BARs)
    above 1 MiB of RAM."""
    space = mmio_space()
    regions = []
    with space.transaction():
        space.root.add_subregion(0, RamRegion("ram", 1 << 20, bytearray(1 << 20)))
        for index in range(ranges):
            region = IoRegion(f"bar{index}", STRIDE, Registers(), impl=AccessSizes(4, 4))
            space.root.add_subregion(BASE + index * STRIDE, region)
            regions.append(region)
    return space, regions


def best_ns(function, repeats: int = 25) -> float:
    """Best-of-`repeats` nanoseconds per operation of function() -> operations done.

    Short batches, many repeats: on a shared two-core machine the best batch is the one that
    ran undisturbed, which is the figure worth comparing."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter_ns()
        operations = function()
        best = min(best, (time.perf_counter_ns() - start) / operations)
    return best


def probes(ranges: int, count: int = 1000) -> list[int]:
    generator = random.Random(ranges)
    return [
        BASE + generator.randrange(ranges) * STRIDE + 4 * generator.randrange(4)
        for _ in range(count)
    ]


def loop_overhead(addresses: list[int]) -> float:
    def empty():
        for _address in addresses:
            pass
        return len(addresses)

    return best_ns(empty)


def lookup_cases(ranges: int, rounds: int) -> list[dict]:
    space, _ = build_space(ranges)
    view = space.view
    starts, entries = view.starts, view.entries
    addresses = probes(ranges)
    overhead = loop_overhead(addresses)

    def flat_lookup():
        for _ in range(rounds):
            for address in addresses:
                entry = view.memo.get(address)
                if entry is None:
                    entry = view.page_entry(address >> view.page_shift)
                    if entry is None:
                        entry = view.entry_for(address)
                    elif len(view.memo) < MEMO_LIMIT:
                        view.memo[address] = entry
                if address + 4 > entry[0]:
                    raise AssertionError("probe missed")
        return rounds * len(addresses)

    def cold_lookup():
        for _ in range(rounds):
            view.memo.clear()
            for address in addresses:
                entry = view.memo.get(address)
                if entry is None:
                    entry = view.page_entry(address >> view.page_shift)
                    if entry is None:
                        entry = view.entry_for(address)
                    elif len(view.memo) < MEMO_LIMIT:
                        view.memo[address] = entry
                if address + 4 > entry[0]:
                    raise AssertionError("probe missed")
        return rounds * len(addresses)

    def bisect_lookup():
        for _ in range(rounds):
            for address in addresses:
                entry = entries[bisect_right(starts, address) - 1]
                if address + 4 > entry[0]:
                    raise AssertionError("probe missed")
        return rounds * len(addresses)

    by_address = dict.fromkeys(addresses)

    def dict_lookup():
        for _ in range(rounds):
            for address in addresses:
                by_address[address]
        return rounds * len(addresses)

    table = [(flat.start, flat.end, flat.region) for flat in view.assigned()]

    def linear_scan():
        scan_rounds = max(1, rounds // max(1, ranges // 20))
        for _ in range(scan_rounds):
            for address in addresses:
                for start, end, _region in table:
                    if start <= address < end:
                        break
        return scan_rounds * len(addresses)

    def build_index():
        fresh = FlatView(space.name, False, space.root, space.size)
        fresh.entry_for(0)
        return 1

    def build_view():
        FlatView(space.name, False, space.root, space.size)
        return 1

    index_ns = best_ns(build_index, repeats=10) - best_ns(build_view, repeats=10)
    flat_ns = best_ns(flat_lookup) - overhead
    cold_ns = best_ns(cold_lookup) - overhead
    bisect_ns = best_ns(bisect_lookup) - overhead
    dict_ns = best_ns(dict_lookup) - overhead
    linear_ns = best_ns(linear_scan, repeats=5) - overhead
    assigned = len(view.assigned()) - 1
    return [
        {
            "case": f"lookup_{ranges}",
            "ranges": assigned,
            "ns_per_op": round(flat_ns, 1),
            "vs_dict": round(flat_ns / dict_ns, 2),
            "vs_linear_scan": round(flat_ns / linear_ns, 4),
        },
        {
            "case": f"lookup_cold_{ranges}",
            "ranges": assigned,
            "ns_per_op": round(cold_ns, 1),
            "vs_dict": round(cold_ns / dict_ns, 2),
            "vs_linear_scan": round(cold_ns / linear_ns, 4),
        },
        {
            "case": f"lookup_bisect_{ranges}",
            "ranges": assigned,
            "ns_per_op": round(bisect_ns, 1),
            "vs_dict": round(bisect_ns / dict_ns, 2),
            "vs_linear_scan": round(bisect_ns / linear_ns, 4),
        },
        {"case": f"page_index_{ranges}", "ranges": assigned, "ns_per_op": round(index_ns)},
        {"case": f"reference_dict_{ranges}", "ranges": assigned, "ns_per_op": round(dict_ns, 1)},
        {
            "case": f"reference_linear_scan_{ranges}",
            "ranges": assigned,
            "ns_per_op": round(linear_ns, 1),
        },
    ]


VIRTIO_PCI_PARTS = ((0x0000, 0x38), (0x1000, 4), (0x2000, 0x3C), (0x3000, 8), (0x4000, 0x30))
"""Offsets and sizes of the register blocks of a virtio-pci BAR (common, ISR, device, notify,
MSI-X table): each at the start of its own page, the rest of the page unassigned."""


def subpage_lookup_case(bars: int, rounds: int) -> dict:
    """The first-access lookup where device registers are smaller than a page: `bars`
    virtio-pci-like BARs of 32 KiB, probed at their register blocks."""
    space = mmio_space()
    with space.transaction():
        space.root.add_subregion(0, RamRegion("ram", 1 << 20, bytearray(1 << 20)))
        for bar in range(bars):
            container = ContainerRegion(f"bar{bar}", 0x8000)
            for part, (offset, size) in enumerate(VIRTIO_PCI_PARTS):
                region = IoRegion(f"bar{bar}.{part}", size, Registers(), impl=AccessSizes(4, 4))
                container.add_subregion(offset, region)
            space.root.add_subregion(BASE + 0x8000 * bar, container)
    view = space.view
    generator = random.Random(bars)
    addresses = [
        BASE + 0x8000 * generator.randrange(bars) + generator.choice(VIRTIO_PCI_PARTS)[0]
        for _ in range(1000)
    ]
    overhead = loop_overhead(addresses)

    def cold_lookup():
        for _ in range(rounds):
            view.memo.clear()
            for address in addresses:
                entry = view.memo.get(address)
                if entry is None:
                    entry = view.page_entry(address >> view.page_shift)
                    if entry is None:
                        entry = view.entry_for(address)
                    elif len(view.memo) < MEMO_LIMIT:
                        view.memo[address] = entry
                if address + 4 > entry[0]:
                    raise AssertionError("probe missed")
        return rounds * len(addresses)

    starts, entries = view.starts, view.entries

    def bisect_lookup():
        for _ in range(rounds):
            for address in addresses:
                entries[bisect_right(starts, address) - 1]
        return rounds * len(addresses)

    cold_ns = best_ns(cold_lookup) - overhead
    return {
        "case": f"lookup_cold_subpage_{bars * len(VIRTIO_PCI_PARTS)}",
        "ranges": len(view.assigned()) - 1,
        "ns_per_op": round(cold_ns, 1),
        "bisect_ns": round(best_ns(bisect_lookup) - overhead, 1),
        "what": "first access to a register block smaller than a page (virtio-pci BARs)",
    }


def dispatch_cases(ranges: int, rounds: int) -> list[dict]:
    space, _ = build_space(ranges)
    addresses = probes(ranges)
    overhead = loop_overhead(addresses)
    read, write = space.read, space.write
    cases = []

    def plain_read():
        for _ in range(rounds):
            for address in addresses:
                read(address, 4)
        return rounds * len(addresses)

    def plain_write():
        for _ in range(rounds):
            for address in addresses:
                write(address, 4, 0x1234)
        return rounds * len(addresses)

    def split_read():
        for _ in range(rounds):
            for address in addresses:
                read(address & ~7, 8)
        return rounds * len(addresses)

    def narrow_write():
        for _ in range(rounds):
            for address in addresses:
                write(address + 1, 1, 0x55)
        return rounds * len(addresses)

    traced = []

    def traced_read():
        space.trace = lambda *event: traced.append(event)
        try:
            for _ in range(rounds):
                for address in addresses:
                    read(address, 4)
        finally:
            space.trace = None
            traced.clear()
        return rounds * len(addresses)

    def watched_read():
        """A watch on a range these reads never touch: the cost of looking at it."""
        watches = WatchList(lambda watch, access: None)
        watches.add(Watch(space.name, 0x1000, 0x2000, print))
        space.add_trace(watches)
        try:
            for _ in range(rounds):
                for address in addresses:
                    read(address, 4)
        finally:
            space.remove_trace(watches)
        return rounds * len(addresses)

    recorder = Recorder(os.devnull)  # one recording: its names are numbered once
    recorder.begin({})

    def recorded_read():
        """`--record`: every access written to a record file (here /dev/null)."""
        recorder.attach(port_io_space(), space)
        try:
            for _ in range(rounds):
                for address in addresses:
                    read(address, 4)
        finally:
            space.remove_trace(recorder._trace_mmio)
        return rounds * len(addresses)

    for name, function, note in (
        ("dispatch_plain_read", plain_read, "aligned 4-byte read, 4-byte handler"),
        ("dispatch_plain_write", plain_write, "aligned 4-byte write, 4-byte handler"),
        ("dispatch_split_read", split_read, "8-byte read split into two 4-byte calls"),
        ("dispatch_narrow_write", narrow_write, "1-byte write widened: read-modify-write"),
        ("dispatch_plain_read_traced", traced_read, "plain read with a trace hook set"),
        ("dispatch_plain_read_watched", watched_read, "plain read, one watch elsewhere"),
        ("dispatch_plain_read_recorded", recorded_read, "plain read while recording"),
    ):
        cases.append(
            {
                "case": name,
                "ranges": ranges,
                "ns_per_op": round(best_ns(function) - overhead, 1),
                "what": note,
            }
        )
    recorder.close()
    return cases


def rebuild_case(ranges: int) -> dict:
    space, regions = build_space(ranges)
    space.add_listener(RecordingListener())
    moved = regions[ranges // 2]
    home, away = moved.offset, BASE + (ranges + 1) * STRIDE

    def move_twice():
        moved.move(away)
        moved.move(home)
        return 2

    return {
        "case": f"rebuild_bar_move_{ranges}",
        "ranges": ranges,
        "ns_per_op": round(best_ns(move_twice, repeats=15)),
        "what": "region.move() with a listener attached: render, publish, diff",
    }


def pci_rebuild_case() -> dict:
    """A guest BAR write through conf1 on a bus with 31 x 8 functions x 6 BARs."""
    io, mmio = port_io_space(), mmio_space()
    host = PciHostBridge(io, mmio)
    allocator = BarAllocator(
        PciWindow("io", 0x1000, 0xF000), PciWindow("mmio32", 0x8000_0000, 0x7000_0000)
    )
    with mmio.transaction():
        for slot in range(1, 32):
            for function in range(8):
                device = PciDevice(f"d{slot}.{function}", 0x1AF4, 0x1000, 0x020000)
                for index in range(6):
                    region = IoRegion(f"d{slot}.{function}-bar{index}", 0x1000, Registers())
                    device.add_bar(index, BarKind.MEM32, 0x1000, region)
                host.attach(device, slot, function)
                allocator.assign(device)
    ranges = len(mmio.view.assigned())
    target = host.bus.functions[(16 << 3) | 3]
    home = target.bar_address(0)
    io.write(0xCF8, 4, 0x8000_0000 | 16 << 11 | 3 << 8 | 0x10)

    def program_twice():
        io.write(0xCFC, 4, 0xF000_0000)
        io.write(0xCFC, 4, home)
        return 2

    return {
        "case": "rebuild_pci_bar_write",
        "ranges": ranges,
        "ns_per_op": round(best_ns(program_twice, repeats=15)),
        "what": "guest conf1 BAR write moving one BAR among all PCI BARs",
    }


def main() -> None:
    quick = "--quick" in sys.argv
    rounds = 2 if quick else 10
    print(json.dumps({"case": "machine", "python": platform.python_version()}))
    results = []
    for ranges in (4, 20, 200, 1536):
        results += lookup_cases(ranges, rounds)
    results.append(subpage_lookup_case(307, rounds))
    for ranges in (20, 1536):
        results += dispatch_cases(ranges, max(1, rounds // 4))
    results += [rebuild_case(20), rebuild_case(1536), pci_rebuild_case()]
    for result in results:
        target = TARGETS.get(result["case"])
        if target is not None and result["ranges"] >= 1530:
            result["target_ns"] = target
            result["meets_target"] = result["ns_per_op"] <= target
        elif result["case"] == "dispatch_plain_read":
            result["target_ns"] = TARGETS["dispatch_plain_read"]
            result["meets_target"] = result["ns_per_op"] <= result["target_ns"]
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
