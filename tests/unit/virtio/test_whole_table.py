"""The many-buffer fast path: indirect tables read whole, bounds checked once, data moved with
one preadv/pwritev on an iovec built from guest addresses.

Deterministic cases (scattered pages as Linux posts an O_DIRECT request, buffers in a second
RAM bank, an image that shrank under the device, O_DIRECT) check the data; hypothesis checks
that the whole-table walk agrees with the one-descriptor-at-a-time walk on hostile, nearly
in-order tables, and that a block device fed such tables never raises and reads the right bytes.
"""

from __future__ import annotations

import ctypes
import itertools
import random
import struct

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from kvmlet.errors import GuestMemoryError
from kvmlet.memory import GuestMemory
from kvmlet.virtio import queue as queue_module
from kvmlet.virtio.blk import (
    SECTOR_SIZE,
    VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
    VirtioBlock,
)
from kvmlet.virtio.blk_config import DiskConfig
from kvmlet.virtio.queue import (
    MAX_QUEUE_SIZE,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    WHOLE_TABLE_MIN_ENTRIES,
    Virtqueue,
    VirtqueueError,
)
from tests.helpers.virtio_driver import MockDriver

PAGE = 4096
LOW, HIGH = (0, 0x100000), (0x200000, 0x100000)
IMAGE_BYTES = 1 << 20


def image_bytes(seed: int = 1) -> bytes:
    return random.Random(seed).randbytes(IMAGE_BYTES)


@pytest.fixture
def two_banks():
    memory = GuestMemory.anonymous([LOW, HIGH])
    yield memory
    memory.close()


@pytest.fixture
def disk(tmp_path, two_banks):
    devices = []

    def make(data: bytes = image_bytes(), **flags):
        path = tmp_path / f"disk{len(devices)}.img"
        path.write_bytes(data)
        device = VirtioBlock(two_banks, DiskConfig(str(path), **flags))
        devices.append(device)
        driver = MockDriver(device, two_banks, 0x1000, 0x40000)
        driver.initialize()
        return device, driver, path

    yield make
    for device in devices:
        device.close()


def scattered_pages(count: int, base: int, seed: int = 7) -> list[tuple[int, int]]:
    """`count` pages, no two adjacent, shuffled: an O_DIRECT buffer after Linux merged it."""
    pages = [(base + 2 * index * PAGE, PAGE) for index in range(count)]
    random.Random(seed).shuffle(pages)
    return pages


def run(driver, request_type, sector, data_buffers):
    """Post one request with its data in `data_buffers` through an indirect table; returns
    (status, used length), or None when the request did not complete."""
    memory = driver.memory
    header, status = driver.allocate(16), driver.allocate(1)
    memory.write(header, struct.pack("<IIQ", request_type, 0, sector))
    memory.write_u8(status, 0xEE)
    if request_type == VIRTIO_BLK_T_IN:
        readable, writable = [(header, 16)], [*data_buffers, (status, 1)]
    else:
        readable, writable = [(header, 16), *data_buffers], [(status, 1)]
    driver.post(0, readable, writable, indirect=True)
    driver.kick(0)
    completions = driver.collect(0)
    if not completions:
        return None
    (completion,) = completions
    return memory.read_u8(status), completion.length


def gather(memory, buffers) -> bytes:
    return b"".join(memory.read(address, length) for address, length in buffers)


@pytest.mark.parametrize("bank", [LOW[0] + 0x80000, HIGH[0]], ids=["low-ram", "second-bank"])
def test_scattered_page_read_returns_the_image_bytes(disk, two_banks, bank):
    device, driver, path = disk()
    pages = scattered_pages(32, bank)
    status, used = run(driver, VIRTIO_BLK_T_IN, 16, pages)
    assert (status, used) == (VIRTIO_BLK_S_OK, 32 * PAGE + 1)
    assert gather(two_banks, pages) == path.read_bytes()[16 * SECTOR_SIZE :][: 32 * PAGE]
    assert not device.stats()["needs_reset"]


@pytest.mark.parametrize("direct", [False, True])
def test_scattered_page_write_reaches_the_file(disk, two_banks, direct):
    _, driver, path = disk(direct=direct)
    pages = scattered_pages(16, 0x80000)
    payload = random.Random(3).randbytes(16 * PAGE)
    for index, (address, _) in enumerate(pages):
        two_banks.write(address, payload[index * PAGE : (index + 1) * PAGE])
    assert run(driver, VIRTIO_BLK_T_OUT, 8, pages) == (VIRTIO_BLK_S_OK, 1)
    assert path.read_bytes()[8 * SECTOR_SIZE :][: 16 * PAGE] == payload


def test_unaligned_buffers_with_direct_io_still_read_right(disk, two_banks):
    _, driver, path = disk(direct=True)
    buffers = [(0x80000 + 3 * PAGE * index + 512, PAGE) for index in range(10)]
    assert run(driver, VIRTIO_BLK_T_IN, 0, buffers) == (VIRTIO_BLK_S_OK, 10 * PAGE + 1)
    assert gather(two_banks, buffers) == path.read_bytes()[: 10 * PAGE]


def test_an_image_that_shrank_under_the_device_fails_the_read_with_ioerr(disk):
    device, driver, path = disk()
    with path.open("r+b") as image:
        image.truncate(IMAGE_BYTES - 4 * PAGE)
    status, _ = run(
        driver,
        VIRTIO_BLK_T_IN,
        (IMAGE_BYTES - 8 * PAGE) // SECTOR_SIZE,
        scattered_pages(8, 0x80000),
    )
    assert status == VIRTIO_BLK_S_IOERR
    assert not device.stats()["needs_reset"]


def test_buffers_across_the_end_of_a_bank_reset_the_device(disk):
    device, driver, _ = disk()
    pages = scattered_pages(8, 0x80000)
    pages[3] = (LOW[1] - PAGE // 2, PAGE)  # half in RAM, half in the gap between the banks
    assert run(driver, VIRTIO_BLK_T_IN, 0, pages) is None
    assert device.stats()["needs_reset"]


def test_memory_batches_check_every_buffer(two_banks):
    inside = ([0x1000, 0x5000, LOW[1] - 16], [16, PAGE, 16])
    assert two_banks.contains_all(*inside)
    assert [len(view) for view in two_banks.views(*inside)] == [16, PAGE, 16]
    for addresses, lengths in [
        ([0x1000, LOW[1] - 16], [16, 17]),  # past the end of the low bank
        ([0x1000, HIGH[0]], [16, 16]),  # in the second bank: checked one by one
        ([0x1000, 0x2000], [16, -1]),
        ([-16, 0x2000], [16, 16]),
    ]:
        assert not two_banks.contains_all(addresses, lengths)
        assert two_banks.host_iovec(addresses, lengths) is None
    many = ([LOW[1] - 16] * 8 + [HIGH[1] + HIGH[0] - 8], [16] * 8 + [16])
    with pytest.raises(GuestMemoryError):
        two_banks.views(*many)


def test_a_host_iovec_points_at_the_guest_bytes_and_pins_the_bank():
    memory = GuestMemory.anonymous([(0, 0x10000)])
    memory.write(0x2000, b"guest bytes")
    iovec = memory.host_iovec([0x2000, 0x3000], [11, 5])
    assert (iovec.count, iovec.words.tolist()[1::2]) == (2, [11, 5])
    second = iovec.part(1, 2)
    assert (second.count, second.words.tolist()) == (1, iovec.words.tolist()[2:])
    assert not iovec.page_aligned(PAGE) and memory.host_iovec([0x3000], [PAGE]).page_aligned(PAGE)
    with second:
        pass  # releases the part's own pin only
    memory.close()  # the pin keeps the mapping alive until released
    assert ctypes.string_at(iovec.words[0], 11) == b"guest bytes"
    with iovec:
        pass
    with pytest.raises(ValueError):
        iovec.pin.tobytes()


@pytest.mark.parametrize("wants_iovec", [True, False])
def test_a_whole_table_brings_an_iovec_or_the_views_its_queue_wants(two_banks, wants_iovec):
    queue = Virtqueue(two_banks, 16)
    queue.wants_iovec = wants_iovec
    queue.descriptor_table, queue.available_ring, queue.used_ring = 0x1000, 0x1200, 0x1300
    queue.activate(event_index=True, indirect=True)
    pages = scattered_pages(WHOLE_TABLE_MIN_ENTRIES, 0x10000)
    for index, (address, length) in enumerate(pages):
        two_banks.write(address, bytes([index]) * length)
        flags = VIRTQ_DESC_F_WRITE | (VIRTQ_DESC_F_NEXT if index < len(pages) - 1 else 0)
        two_banks.write(
            0x1800 + 16 * index, struct.pack("<QIHH", address, length, flags, index + 1)
        )
    two_banks.write(0x1000, struct.pack("<QIHH", 0x1800, 16 * len(pages), VIRTQ_DESC_F_INDIRECT, 0))
    chain = queue._walk(0)
    assert (chain.iovec is not None) == wants_iovec
    assert (chain.known_views is None) == wants_iovec
    assert chain.addresses == [address for address, _ in pages]
    assert [bytes(view) for view in chain.views] == [bytes([i]) * PAGE for i in range(len(pages))]
    queue.reset()


# -- hypothesis: hostile, nearly in-order indirect tables ------------------------------------

QUEUE = 16
DESCRIPTORS, AVAILABLE, USED, TABLE = 0x1000, 0x1200, 0x1300, 0x1800
LOW_RAM_BUFFERS = st.tuples(st.integers(0x4000, 0xF0000), st.integers(0, 0x200))
EDGE_BUFFERS = st.tuples(
    st.one_of(
        st.integers(HIGH[0] - 0x10, HIGH[0] + 0x4000),  # the second bank or the gap before it
        st.sampled_from([LOW[1] - 0x100, LOW[1] - 1, LOW[1], HIGH[0] + HIGH[1] - 0x10, 2**64 - 1]),
    ),
    st.one_of(st.integers(0, 0x200), st.sampled_from([PAGE, 0x10000, 2**32 - 1])),
)
IN_ORDER = st.tuples(
    st.integers(1, QUEUE - 2),  # readable buffers
    st.lists(LOW_RAM_BUFFERS, min_size=WHOLE_TABLE_MIN_ENTRIES, max_size=QUEUE + 2),
    # a few buffers replaced by ones in the second bank, across a bank's end or past RAM
    st.lists(st.tuples(st.integers(0, QUEUE + 1), EDGE_BUFFERS), max_size=2),
)
FLIPS = st.lists(st.tuples(st.integers(0, 16 * (QUEUE + 2) - 1), st.integers(1, 255)), max_size=3)


def write_in_order_table(memory, readable_count, buffers, edges, flips) -> int:
    """An in-order table (readable first) with some buffers replaced by `edges`, then a few
    flipped bytes; returns its length."""
    buffers = list(buffers)
    for position, buffer in edges:
        if position < len(buffers):
            buffers[position] = buffer
    readable_count = min(readable_count, len(buffers) - 1)
    for index, (address, length) in enumerate(buffers):
        flags = 0 if index < readable_count else VIRTQ_DESC_F_WRITE
        if index < len(buffers) - 1:
            flags |= VIRTQ_DESC_F_NEXT
        entry = struct.pack("<QIHH", address, length, flags, index + 1)
        memory.write(TABLE + 16 * index, entry)
    for offset, flip in flips:
        if offset < 16 * len(buffers):
            memory.write_u8(TABLE + offset, memory.read_u8(TABLE + offset) ^ flip)
    return 16 * len(buffers)


def disjoint(buffers) -> bool:
    """Whether no two (address, length) buffers share a byte (else a later one's data wins)."""
    spans = sorted((address, address + length) for address, length in buffers)
    return all(end <= start for (_, end), (start, _) in itertools.pairwise(spans))


def outcome(queue, head, whole_tables=True):
    """What walking `head` gives: the chain's buffers and bytes, or "refused"; with
    `whole_tables` False, no table is read whole (every descriptor is walked one by one)."""
    saved = queue_module.WHOLE_TABLE_MIN_ENTRIES
    queue_module.WHOLE_TABLE_MIN_ENTRIES = saved if whole_tables else MAX_QUEUE_SIZE + 1
    try:
        chain = queue._walk(head)
    except VirtqueueError:
        return "refused"
    finally:
        queue_module.WHOLE_TABLE_MIN_ENTRIES = saved
    return (
        chain.addresses,
        chain.lengths,
        chain.readable_count,
        chain.readable_length,
        chain.writable_length,
        [bytes(view) for view in chain.views],
        bytes(chain.first_view),
        bytes(chain.last_view),
    )


@pytest.mark.parametrize("wants_iovec", [True, False])
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(table=IN_ORDER, flips=FLIPS)
def test_whole_table_walk_agrees_with_the_walk_one_by_one(wants_iovec, table, flips):
    """Whether the whole table comes with an iovec (virtio-blk) or views of every buffer
    (virtio-9p), its chain is the one the one-by-one walk gives, refusals included."""
    memory = GuestMemory.anonymous([LOW, HIGH])
    queue = Virtqueue(memory, QUEUE)
    queue.wants_iovec = wants_iovec
    try:
        queue.descriptor_table, queue.available_ring, queue.used_ring = (
            DESCRIPTORS,
            AVAILABLE,
            USED,
        )
        queue.activate(event_index=True, indirect=True)
        length = write_in_order_table(memory, *table, flips)
        memory.write(DESCRIPTORS, struct.pack("<QIHH", TABLE, length, VIRTQ_DESC_F_INDIRECT, 0))
        fast, slow = outcome(queue, 0), outcome(queue, 0, whole_tables=False)
        event(f"whole table: {fast if fast == 'refused' else 'chain'}")
        assert fast == slow
    finally:
        queue.reset()
        memory.close()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    request_type=st.sampled_from([VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT]),
    sector=st.integers(0, IMAGE_BYTES // SECTOR_SIZE),
    table=IN_ORDER,
    flips=FLIPS,
)
def test_a_block_device_fed_in_order_tables_never_raises(
    tmp_path_factory, request_type, sector, table, flips
):
    path = tmp_path_factory.mktemp("blk") / "disk.img"
    original = image_bytes(2)
    path.write_bytes(original)
    memory = GuestMemory.anonymous([LOW, HIGH])
    device = VirtioBlock(memory, DiskConfig(str(path)))
    try:
        driver = MockDriver(device, memory, 0x1000, 0x800)
        driver.initialize(queue_size=QUEUE)
        readable_count, buffers, edges = table
        if request_type == VIRTIO_BLK_T_IN:
            readable_count = 1
            buffers = [(0x3000, 16), *buffers[1:]]
        else:
            buffers = [(0x3000, 16), *buffers[1:-1], (0x3100, 1)]
            readable_count = max(readable_count, 1)
        memory.write(0x3000, struct.pack("<IIQ", request_type, 0, sector))
        length = write_in_order_table(memory, readable_count, buffers, edges, flips)
        driver.write_descriptor(driver.queues[0], 0, TABLE, length, VIRTQ_DESC_F_INDIRECT, 0)
        driver.make_available(driver.queues[0], 0)
        device.notify(0)
        needs_reset = device.stats()["needs_reset"]
        completed = memory.read_u16(driver.queues[0].used_ring + 2)
        event(f"needs reset: {needs_reset}")
        assert needs_reset or completed == 1
        if needs_reset or request_type != VIRTIO_BLK_T_IN:
            return
        chain = device.queues[0]._walk(0)
        status = chain.views[-1][-1] if chain.lengths[-1] else None
        if chain.lengths[-1] == 1 and status == VIRTIO_BLK_S_OK and disjoint(chain.writable):
            data = b"".join(bytes(view) for view in chain.writable_views[:-1])
            offset = sector * SECTOR_SIZE
            assert data == original[offset : offset + len(data)]
    finally:
        device.close()
        memory.close()
