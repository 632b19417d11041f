"""virtio-balloon (virtio 1.2 §5.5): memory the guest gives back to the host, and its statistics.

The host sets a target (`num_pages` in the configuration space, in 4 KiB pages); the guest's
driver inflates the balloon towards it by taking pages from its allocator and listing their
page frame numbers (PFNs) on the inflate queue, or deflates it by listing pages it takes back
on the deflate queue, and reports the balloon's size in `actual`. The device releases every
inflated page on the host (`GuestMemory.discard`: MADV_DONTNEED, or MADV_REMOVE for shared
RAM), so the monitor's RSS really drops; a deflated page needs nothing (the host backs it with
a fresh zero page when the guest next touches it).

Two optional queues: the statistics queue, on which the driver keeps one buffer of
(tag, value) pairs posted that the device returns when it wants fresh figures; and free page
reporting, on which the driver lists free blocks of its own (2 MiB and up on x86) that the
device releases the same way, whatever the target.

Inflate, deflate and reporting are request-driven (`handle_request`, one buffer a request, on
the device's worker); the statistics queue is not: the device keeps the newest buffer and gives
it back only when the host wants figures, so its `serve` holds rather than completes. The held
buffer belongs to one activation of the queue (a reset drops it, it is never pushed into a new
driver's ring).

The PFN lists come from the guest: a PFN outside RAM is ignored, a page already in the balloon
is not released twice, at most `MAX_PFNS_PER_REQUEST` PFNs of one buffer are read, and a
bitmap (one bit per guest page) keeps the count of inflated pages exact.
"""

from __future__ import annotations

import array
import sys
import threading
import time
from collections.abc import Callable

from kvmlet.errors import GuestMemoryError
from kvmlet.memory import GuestMemory
from kvmlet.virtio.device import VirtioDevice
from kvmlet.virtio.queue import DescriptorChain, VirtqueueError
from kvmlet.virtio.serving import ROUND_REQUESTS, Request

VIRTIO_ID_BALLOON = 5

VIRTIO_BALLOON_F_STATS_VQ = 1
VIRTIO_BALLOON_F_PAGE_REPORTING = 5

PAGE_SIZE = 4096
"""The balloon's unit: PFNs are guest-physical address >> 12 whatever the page size."""
QUEUE_SIZE = 128
REPORTING_QUEUE_SIZE = 64
"""Linux's free page reporting needs at least 32 entries (PAGE_REPORTING_CAPACITY)."""
MAX_PFNS_PER_REQUEST = 4096
"""Linux lists at most 256 PFNs per buffer; more in one buffer are ignored (and counted)."""
MAX_STATISTICS = 64
"""Statistics entries read from one buffer (Linux 6.1 sends 10)."""

INFLATE, DEFLATE, STATISTICS, REPORTING = "inflate", "deflate", "statistics", "reporting"

STATISTIC_NAMES = {
    0: "swap_in",
    1: "swap_out",
    2: "major_faults",
    3: "minor_faults",
    4: "free_memory",
    5: "total_memory",
    6: "available_memory",
    7: "disk_caches",
    8: "hugetlb_allocations",
    9: "hugetlb_failures",
}
"""VIRTIO_BALLOON_S_* tags; the memory figures are bytes, the others counts."""
_STATISTIC_SIZE = 10  # le16 tag, le64 value, packed

_CONFIG_ACTUAL = slice(4, 8)
_CONFIG_SIZE = 8


class VirtioBalloon(VirtioDevice):
    """A memory balloon with a statistics queue and free page reporting."""

    device_id = VIRTIO_ID_BALLOON
    name = "virtio-balloon"

    def __init__(self, memory: GuestMemory):
        features = 1 << VIRTIO_BALLOON_F_STATS_VQ | 1 << VIRTIO_BALLOON_F_PAGE_REPORTING
        super().__init__(
            memory,
            [QUEUE_SIZE, QUEUE_SIZE, QUEUE_SIZE, REPORTING_QUEUE_SIZE],
            features,
            bytes(_CONFIG_SIZE),
        )
        self._inflated = [bytearray(-(-bank.size // PAGE_SIZE) // 8 + 1) for bank in memory]
        # Guards the held statistics buffer and the figures; never held with a ring lock.
        self._statistics_ready = threading.Condition(threading.Lock())
        self._held_statistics: tuple[int, int] | None = None  # (head, epoch) the device keeps
        self._reset_counters()

    def _reset_counters(self) -> None:
        for bitmap in self._inflated:
            bitmap[:] = bytes(len(bitmap))
        self.inflated_pages = 0
        self.inflate_requests = self.deflate_requests = 0
        self.ignored_pfns = 0  # outside RAM, or past MAX_PFNS_PER_REQUEST in one buffer
        self.duplicate_pfns = 0  # inflated twice, or deflated while not inflated
        self.discard_errors = 0
        self.reported_bytes = 0  # released through free page reporting
        self.statistics: dict[str, int] = {}
        self.statistics_updated: float | None = None  # time.monotonic() of the last update
        self.statistics_updates = 0
        with self._statistics_ready:
            self._held_statistics = None

    # The host's side ----------------------------------------------------------------------------

    @property
    def target_pages(self) -> int:
        return int.from_bytes(self._config[0:4], "little")

    @property
    def actual_pages(self) -> int:
        """The balloon's size as the driver last reported it (`actual`)."""
        return int.from_bytes(self._config[_CONFIG_ACTUAL], "little")

    def set_target(self, pages: int) -> None:
        """Ask the guest to hold `pages` 4 KiB pages in the balloon (a configuration change)."""
        if not 0 <= pages <= 0xFFFF_FFFF:
            raise ValueError(f"balloon target of {pages} pages")
        with self._lock:
            config = bytearray(self._config)
            config[0:4] = pages.to_bytes(4, "little")
            self.update_config(bytes(config))

    def request_statistics(self, timeout: float) -> bool:
        """Give the guest its statistics buffer back (asking for fresh figures) and wait up to
        `timeout` seconds for them; False when none arrived (no buffer held, a driver without
        the statistics queue, or a paused machine)."""
        queue_index = self._queue_index(STATISTICS)
        if queue_index is None or not self.running:
            return False
        with self._statistics_ready:
            held, self._held_statistics = self._held_statistics, None
            updates = self.statistics_updates
        if held is None or not self._give_back(queue_index, *held):
            return False
        self.signal_used(queue_index)
        with self._statistics_ready:
            return self._statistics_ready.wait_for(
                lambda: self.statistics_updates != updates, timeout
            )

    def _give_back(self, queue_index: int, head: int, epoch: int) -> bool:
        """Return a held statistics buffer, unless its queue was reset since it was taken."""
        queue = self.queues[queue_index]
        with queue.lock:
            if not queue.active or queue.epoch != epoch:
                return False
            queue.push(head, 0)
            return True

    def stats(self) -> dict[str, object]:
        """Read without a lock, as every device's."""
        return {
            **super().stats(),
            "target_pages": self.target_pages,
            "actual_pages": self.actual_pages,
            "inflated_pages": self.inflated_pages,
            "inflate_requests": self.inflate_requests,
            "deflate_requests": self.deflate_requests,
            "ignored_pfns": self.ignored_pfns,
            "duplicate_pfns": self.duplicate_pfns,
            "discard_errors": self.discard_errors,
            "reported_bytes": self.reported_bytes,
        }

    # Snapshots ----------------------------------------------------------------------------------

    def save_state(self) -> dict[str, object]:
        """The device's, plus which pages are in the balloon (a bitmap per bank), the buffer
        of statistics the device holds and the guest's last figures (not the counters: the
        process's statistics start at zero after a restore, as every device's)."""
        with self._lock:
            updated = self.statistics_updated
            return {
                **super().save_state(),
                "inflated": [bytes(bitmap) for bitmap in self._inflated],
                "held_statistics": self._held_statistics,
                "statistics": dict(self.statistics),
                "statistics_age": None if updated is None else time.monotonic() - updated,
            }

    def load_state(self, state: dict) -> None:
        with self._lock:
            super().load_state(state)
            bitmaps = [bytes(bitmap) for bitmap in state["inflated"]]
            if [len(bitmap) for bitmap in bitmaps] != [len(bitmap) for bitmap in self._inflated]:
                raise ValueError("the balloon's bitmaps are for another RAM layout")
            for bitmap, saved in zip(self._inflated, bitmaps, strict=True):
                bitmap[:] = saved
            self.inflated_pages = int.from_bytes(b"".join(bitmaps), "little").bit_count()
            held = state["held_statistics"]
            self._held_statistics = None if held is None else held & 0xFFFF
            self.statistics = {str(name): int(value) for name, value in state["statistics"].items()}
            age = state["statistics_age"]
            self.statistics_updated = None if age is None else time.monotonic() - float(age)

    # The driver's side --------------------------------------------------------------------------

    def write_config(self, offset: int, size: int, value: int) -> None:
        """The driver writes `actual` (bytes 4-7); `num_pages` is the device's."""
        with self._lock:
            data = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
            for index, byte in enumerate(data, start=offset):
                if _CONFIG_ACTUAL.start <= index < _CONFIG_ACTUAL.stop:
                    self._config[index] = byte

    def activate(self) -> None:
        """DRIVER_OK: have the worker serve what the driver posted before it (Linux primes the
        statistics queue with its first buffer and kicks it before setting DRIVER_OK, when the
        device did not serve it yet)."""
        for index, queue in enumerate(self.queues):
            if queue.active:
                self.notify(index)

    def reset_device(self) -> None:
        """A reset gives every page back to the guest: the balloon starts empty."""
        self._reset_counters()
        config = bytearray(self._config)
        config[_CONFIG_ACTUAL] = bytes(4)
        self._config[:] = config

    def _queue_index(self, role: str) -> int | None:
        """Which queue plays `role`: the optional queues that were not negotiated take no
        index, so the reporting queue is 2 without the statistics queue (as Linux and QEMU
        number them)."""
        roles = [INFLATE, DEFLATE]
        if self.negotiated(VIRTIO_BALLOON_F_STATS_VQ):
            roles.append(STATISTICS)
        if self.negotiated(VIRTIO_BALLOON_F_PAGE_REPORTING):
            roles.append(REPORTING)
        return roles.index(role) if role in roles else None

    def serve(self, queue_index: int, lend_hand: Callable[[], None] | None = None) -> bool:
        if queue_index == self._queue_index(STATISTICS):
            return self._take_statistics(queue_index)
        return super().serve(queue_index, lend_hand)

    def handle_request(self, request: Request) -> int:
        role = self._queue_role(request.queue_index)
        if role == INFLATE:
            return self._inflate(request.chain)
        if role == DEFLATE:
            return self._deflate(request.chain)
        if role == REPORTING:
            return self._report_free_pages(request.chain)
        return 0  # a queue the driver did not negotiate: completed untouched

    def _queue_role(self, queue_index: int) -> str | None:
        for role in (INFLATE, DEFLATE, REPORTING):
            if self._queue_index(role) == queue_index:
                return role
        return None

    def _pfns(self, chain: DescriptorChain) -> list[int]:
        """The distinct PFNs of a request, at most MAX_PFNS_PER_REQUEST, in ascending order."""
        count = chain.readable_length // 4
        if count > MAX_PFNS_PER_REQUEST:
            self.ignored_pfns += count - MAX_PFNS_PER_REQUEST
            count = MAX_PFNS_PER_REQUEST
        words = array.array("I", chain.read(0, 4 * count))
        if sys.byteorder != "little":
            words.byteswap()
        distinct = sorted(set(words))
        self.duplicate_pfns += len(words) - len(distinct)
        return distinct

    def _locate(self, pfn: int) -> tuple[bytearray, int] | None:
        """The bitmap holding `pfn` and its bit number, or None outside RAM."""
        address = pfn * PAGE_SIZE
        for bank, bitmap in zip(self.memory, self._inflated, strict=True):
            if bank.base <= address < bank.end:
                return bitmap, (address - bank.base) // PAGE_SIZE
        return None

    def _inflate(self, chain: DescriptorChain) -> int:
        self.inflate_requests += 1
        released: list[int] = []
        for pfn in self._pfns(chain):
            located = self._locate(pfn)
            if located is None:
                self.ignored_pfns += 1
                continue
            bitmap, bit = located
            if bitmap[bit >> 3] & 1 << (bit & 7):
                self.duplicate_pfns += 1
                continue
            bitmap[bit >> 3] |= 1 << (bit & 7)
            self.inflated_pages += 1
            released.append(pfn)
        for first, count in _runs(released):
            self._discard(first * PAGE_SIZE, count * PAGE_SIZE)
        return 0

    def _deflate(self, chain: DescriptorChain) -> int:
        self.deflate_requests += 1
        for pfn in self._pfns(chain):
            located = self._locate(pfn)
            if located is None:
                self.ignored_pfns += 1
                continue
            bitmap, bit = located
            if not bitmap[bit >> 3] & 1 << (bit & 7):
                self.duplicate_pfns += 1
                continue
            bitmap[bit >> 3] &= ~(1 << (bit & 7)) & 0xFF
            self.inflated_pages -= 1
        return 0

    def _report_free_pages(self, chain: DescriptorChain) -> int:
        """Free blocks the guest reports: release each (they are in RAM: the chain walk
        checked every buffer) and give the chain back untouched."""
        for address, length in chain.writable:
            start = -(-address // PAGE_SIZE) * PAGE_SIZE
            end = (address + length) // PAGE_SIZE * PAGE_SIZE
            if end > start and self._discard(start, end - start):
                self.reported_bytes += end - start
        return 0

    def _discard(self, address: int, length: int) -> bool:
        try:
            self.memory.discard(address, length)
        except (GuestMemoryError, OSError):
            self.discard_errors += 1
            return False
        return True

    def _take_statistics(self, queue_index: int) -> bool:
        """Keep the newest statistics buffer (the device returns it to ask for fresh figures);
        a driver that posts another while one is held gets the older one back at once. A
        bounded round, like every queue's: True when buffers are left for the next."""
        if not self.running:
            return False
        queue = self.queues[queue_index]
        stats = self.queue_stats[queue_index]
        returned = taken = 0
        broken, epoch = None, queue.epoch
        while taken < ROUND_REQUESTS:
            with queue.lock:
                if not queue.active:
                    break
                epoch = queue.epoch
                try:
                    chain = queue.pop()
                    # With EVENT_IDX the driver kicks for its next buffer only if avail_event
                    # says so.
                    if chain is None and queue.enable_notifications():
                        chain = queue.pop()
                except (VirtqueueError, GuestMemoryError) as error:
                    broken = error
                    break
            if chain is None:
                break
            taken += 1
            stats.requests += 1
            stats.bytes_from_guest += chain.readable_length
            with self._statistics_ready:
                older, self._held_statistics = self._held_statistics, (chain.head, epoch)
                self._read_statistics(chain)
            if older is not None and self._give_back(queue_index, *older):
                returned += 1
        if broken is not None:
            self.fail(f"queue {queue_index}: {broken}", queue_index, epoch)
        if returned:
            self.signal_used(queue_index)
        return taken == ROUND_REQUESTS

    def _read_statistics(self, chain: DescriptorChain) -> None:
        count = min(chain.readable_length // _STATISTIC_SIZE, MAX_STATISTICS)
        data = chain.read(0, count * _STATISTIC_SIZE)
        figures = {}
        for offset in range(0, len(data), _STATISTIC_SIZE):
            tag = int.from_bytes(data[offset : offset + 2], "little")
            name = STATISTIC_NAMES.get(tag)
            if name is not None:
                figures[name] = int.from_bytes(data[offset + 2 : offset + 10], "little")
        self.statistics = figures
        self.statistics_updated = time.monotonic()
        self.statistics_updates += 1
        self._statistics_ready.notify_all()  # the caller holds it


def _runs(pfns: list[int]) -> list[tuple[int, int]]:
    """Ascending PFNs as (first, count) runs of consecutive pages."""
    runs: list[tuple[int, int]] = []
    for pfn in pfns:
        if runs and runs[-1][0] + runs[-1][1] == pfn:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((pfn, 1))
    return runs
