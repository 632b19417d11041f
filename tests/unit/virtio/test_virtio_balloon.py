"""virtio-balloon against a mock driver: inflate, deflate, statistics, free page reporting, and
the hostile page lists a guest can send."""

from __future__ import annotations

import mmap
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvmlet.memory import GuestMemory
from kvmlet.virtio import balloon as balloon_module
from kvmlet.virtio.balloon import (
    MAX_PFNS_PER_REQUEST,
    PAGE_SIZE,
    VIRTIO_BALLOON_F_PAGE_REPORTING,
    VIRTIO_BALLOON_F_STATS_VQ,
    VirtioBalloon,
)
from kvmlet.virtio.device import VIRTIO_F_EVENT_IDX, VIRTIO_F_VERSION_1, InterruptKind
from tests.helpers.virtio_driver import GUEST_RAM_SIZE, MockDriver

ARENA = 0x10000
ARENA_SIZE = 0x40000
"""The driver's rings and buffers; the pages the tests balloon lie above it."""
FIRST_PAGE = (ARENA + ARENA_SIZE) // PAGE_SIZE
ALL_FEATURES = 1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_F_EVENT_IDX | 1 << VIRTIO_BALLOON_F_STATS_VQ
ALL_FEATURES |= 1 << VIRTIO_BALLOON_F_PAGE_REPORTING  # what Linux 6.1 accepts
INFLATE, DEFLATE, STATISTICS, REPORTING = 0, 1, 2, 3


def resident_pages(memory: GuestMemory) -> int:
    start = memory.banks[0].host_address()
    with open("/proc/self/smaps") as smaps:
        inside = False
        for line in smaps:
            if not line[0].isupper():
                inside = int(line.split("-")[0], 16) == start
            elif inside and line.startswith("Rss:"):
                return int(line.split()[1]) * 1024 // mmap.PAGESIZE
    raise AssertionError("guest RAM not found in smaps")


@pytest.fixture
def balloon(memory):
    device = VirtioBalloon(memory)
    yield device
    device.close()


def start(balloon, memory, features=ALL_FEATURES) -> MockDriver:
    driver = MockDriver(balloon, memory, ARENA, ARENA_SIZE)
    driver.negotiate(features)
    queues = 2 + bin(features & (1 << VIRTIO_BALLOON_F_STATS_VQ | 1 << 5)).count("1")
    for index in range(queues):
        driver.setup_queue(index)
    driver.device.write_status(0xF)
    return driver


def post_pfns(driver: MockDriver, queue: int, pfns: list[int]) -> int:
    head, _ = driver.post_data(queue, [struct.pack(f"<{len(pfns)}I", *pfns)], [])
    driver.kick(queue)
    return head


def statistics_buffer(**figures: int) -> bytes:
    tags = {"swap_in": 0, "major_faults": 2, "free_memory": 4, "total_memory": 5}
    return b"".join(struct.pack("<HQ", tags[name], value) for name, value in figures.items())


def test_the_device_offers_statistics_and_free_page_reporting(balloon):
    assert balloon.device_id == 5
    assert balloon.device_features_word(0) & 0xFFFF == 1 << 1 | 1 << 5
    assert balloon.queue_count == 4
    assert balloon.config_size == 8


def test_a_target_is_a_configuration_change_the_driver_is_told_about(balloon, memory):
    driver = start(balloon, memory)
    generation = balloon.config_generation
    balloon.set_target(16384)
    assert balloon.read_config(0, 4) == 16384
    assert balloon.config_generation == generation + 1
    assert driver.interrupts[-1] == (InterruptKind.CONFIG, None)


def test_the_driver_reports_actual_and_cannot_write_the_target(balloon, memory):
    start(balloon, memory)
    balloon.set_target(100)
    balloon.write_config(0, 4, 5)
    balloon.write_config(4, 4, 77)
    assert (balloon.target_pages, balloon.actual_pages) == (100, 77)
    balloon.write_config(6, 1, 1)  # one byte of `actual`
    assert balloon.actual_pages == 77 + (1 << 16)


def test_inflated_pages_go_back_to_the_host_and_read_zero(balloon, memory):
    driver = start(balloon, memory)
    pages = list(range(FIRST_PAGE, FIRST_PAGE + 64))
    memory.fill(FIRST_PAGE * PAGE_SIZE, 128 * PAGE_SIZE, 0x5A)
    before = resident_pages(memory)
    head = post_pfns(driver, INFLATE, pages)
    assert [completion.head for completion in driver.collect(INFLATE)] == [head]
    assert before - resident_pages(memory) == 64
    assert memory.read(FIRST_PAGE * PAGE_SIZE, 64 * PAGE_SIZE) == bytes(64 * PAGE_SIZE)
    assert memory.read_u8((FIRST_PAGE + 64) * PAGE_SIZE) == 0x5A  # the next page is kept
    assert balloon.inflated_pages == 64
    post_pfns(driver, DEFLATE, pages[:16])
    assert balloon.inflated_pages == 48
    assert balloon.stats()["inflate_requests"] == 1


def test_hostile_page_lists_are_bounded_and_ignored_safely(balloon, memory):
    driver = start(balloon, memory)
    outside = [GUEST_RAM_SIZE // PAGE_SIZE, 0xFFFF_FFFF, 1 << 20]
    post_pfns(driver, INFLATE, [FIRST_PAGE, FIRST_PAGE, *outside, FIRST_PAGE + 1])
    post_pfns(driver, INFLATE, [FIRST_PAGE])  # already in the balloon
    post_pfns(driver, DEFLATE, [FIRST_PAGE + 2])  # never inflated
    assert balloon.inflated_pages == 2
    assert balloon.ignored_pfns == 3
    assert balloon.duplicate_pfns == 3
    assert len(driver.collect(INFLATE)) == 2 and len(driver.collect(DEFLATE)) == 1
    assert not driver.needs_reset


def test_a_huge_page_list_is_read_only_up_to_the_limit(balloon, memory):
    driver = start(balloon, memory)
    pages = [FIRST_PAGE + index % 256 for index in range(MAX_PFNS_PER_REQUEST + 1000)]
    post_pfns(driver, INFLATE, pages)
    assert balloon.inflated_pages == 256
    assert balloon.ignored_pfns == 1000
    assert len(driver.collect(INFLATE)) == 1


@given(
    st.lists(
        st.lists(
            st.one_of(
                st.integers(FIRST_PAGE, GUEST_RAM_SIZE // PAGE_SIZE - 1),
                st.integers(FIRST_PAGE, 0xFFFF_FFFF),  # not the driver's own rings
            ),
            max_size=40,
        ),
        max_size=6,
    ),
    st.lists(st.integers(0, 0xFFFF_FFFF), max_size=40),
)
def test_any_page_lists_keep_an_exact_count_and_complete_every_request(inflates, deflates):
    memory = GuestMemory.anonymous([(0, GUEST_RAM_SIZE)])
    balloon = VirtioBalloon(memory)
    try:
        driver = start(balloon, memory)
        expected: set[int] = set()
        in_ram = range(GUEST_RAM_SIZE // PAGE_SIZE)
        for pfns in inflates:
            post_pfns(driver, INFLATE, pfns)
            expected |= {pfn for pfn in pfns if pfn in in_ram}
        post_pfns(driver, DEFLATE, deflates)
        expected -= set(deflates)
        assert balloon.inflated_pages == len(expected)
        assert len(driver.collect(INFLATE)) == len(inflates)
        assert len(driver.collect(DEFLATE)) == 1
        assert not driver.needs_reset
    finally:
        balloon.close()
        memory.close()


def test_statistics_posted_before_driver_ok_are_read_and_refreshed_on_request(balloon, memory):
    driver = MockDriver(balloon, memory, ARENA, ARENA_SIZE)
    driver.negotiate(ALL_FEATURES)
    for index in range(4):
        driver.setup_queue(index)
    driver.post_data(STATISTICS, [statistics_buffer(free_memory=1000, total_memory=4000)], [])
    driver.kick(STATISTICS)  # as Linux does, before DRIVER_OK: not served yet
    assert balloon.statistics == {}
    balloon.write_status(0xF)
    assert balloon.statistics == {"free_memory": 1000, "total_memory": 4000}
    assert driver.collect(STATISTICS) == []  # the device keeps the buffer

    def refill(kind, queue):  # Linux's stats_request: fresh figures on a new buffer
        if kind is InterruptKind.QUEUE and queue == STATISTICS and driver.collect(STATISTICS):
            buffer = statistics_buffer(free_memory=900, major_faults=3, swap_in=1)
            driver.post_data(STATISTICS, [buffer], [])
            if driver.should_kick(STATISTICS, event_index=True):  # as virtqueue_kick decides
                driver.kick(STATISTICS)

    balloon.connect_interrupts(refill)
    assert balloon.request_statistics(timeout=1.0)
    assert balloon.statistics == {"free_memory": 900, "major_faults": 3, "swap_in": 1}
    assert balloon.request_statistics(timeout=1.0)  # and again: the driver kicks each time
    assert balloon.statistics_updates == 3


def test_statistics_requested_of_a_silent_driver_time_out(balloon, memory):
    driver = start(balloon, memory)
    assert not balloon.request_statistics(timeout=0.01)  # no buffer held yet
    driver.post_data(STATISTICS, [statistics_buffer(free_memory=1)], [])
    driver.kick(STATISTICS)
    assert not balloon.request_statistics(timeout=0.05)  # given back, never refilled
    assert len(driver.collect(STATISTICS)) == 1


def test_a_second_statistics_buffer_returns_the_first(balloon, memory):
    driver = start(balloon, memory)
    first, _ = driver.post_data(STATISTICS, [statistics_buffer(free_memory=1)], [])
    driver.post_data(STATISTICS, [statistics_buffer(free_memory=2)], [])
    driver.kick(STATISTICS)
    assert [completion.head for completion in driver.collect(STATISTICS)] == [first]
    assert balloon.statistics == {"free_memory": 2}


def test_reported_free_pages_are_released_whatever_the_target(balloon, memory):
    driver = start(balloon, memory)
    base = FIRST_PAGE * PAGE_SIZE
    memory.fill(base, 32 * PAGE_SIZE, 0x77)
    before = resident_pages(memory)
    driver.post(REPORTING, [], [(base, 16 * PAGE_SIZE), (base + 16 * PAGE_SIZE + 100, 9000)])
    driver.kick(REPORTING)
    assert len(driver.collect(REPORTING)) == 1
    assert balloon.reported_bytes == 16 * PAGE_SIZE + PAGE_SIZE  # the partial pages are kept
    assert before - resident_pages(memory) == 17
    assert balloon.inflated_pages == 0


def test_without_the_statistics_queue_reporting_is_queue_two(balloon, memory):
    driver = start(balloon, memory, 1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_BALLOON_F_PAGE_REPORTING)
    driver.post(2, [], [(FIRST_PAGE * PAGE_SIZE, 4 * PAGE_SIZE)])
    driver.kick(2)
    assert balloon.reported_bytes == 4 * PAGE_SIZE
    assert balloon.statistics == {}


def test_a_reset_empties_the_balloon(balloon, memory):
    driver = start(balloon, memory)
    post_pfns(driver, INFLATE, [FIRST_PAGE, FIRST_PAGE + 1])
    balloon.write_config(4, 4, 2)
    balloon.write_status(0)
    assert balloon.inflated_pages == 0 and balloon.actual_pages == 0


def test_a_statistics_buffer_held_across_a_reset_is_never_given_to_the_next_driver(balloon, memory):
    driver = start(balloon, memory)
    driver.post_data(STATISTICS, [statistics_buffer(free_memory=1)], [])
    driver.kick(STATISTICS)
    assert balloon.statistics == {"free_memory": 1}
    balloon.write_status(0)
    driver = start(balloon, memory)
    assert not balloon.request_statistics(timeout=0.05)
    assert driver.collect(STATISTICS) == [], "the old driver's buffer in the new driver's ring"


def test_a_statistics_round_is_bounded(balloon, memory, monkeypatch):
    """A driver posting buffer after buffer gets the older ones back at once, a round's worth
    at a time: the worker looks at its other queues in between."""
    monkeypatch.setattr(balloon_module, "ROUND_REQUESTS", 3)
    driver = start(balloon, memory)
    for value in range(5):
        driver.post_data(STATISTICS, [statistics_buffer(free_memory=value)], [])
    assert balloon.serve(STATISTICS) is True
    assert len(driver.collect(STATISTICS)) == 2
    assert balloon.serve(STATISTICS) is False
    assert len(driver.collect(STATISTICS)) == 2
    assert balloon.statistics == {"free_memory": 4}
