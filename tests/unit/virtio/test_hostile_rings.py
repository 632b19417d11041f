"""Rings a hostile guest crafts to make the monitor work forever, lose a request or amplify.

Each test is a finding of issue 9 reproduced on the device model: a virtio-blk read whose data
re-arms the ring it came from, a zero-length buffer on an O_DIRECT disk, a device bug in the
middle of a request, console chains whose descriptors all alias one big buffer, and a guest
that breaks its device in a loop to flood the log.
"""

from __future__ import annotations

import logging
import struct
import threading
import time

import pytest

from kvmlet.memory import GuestMemory
from kvmlet.virtio.blk import (
    SECTOR_SIZE,
    VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_T_IN,
    VirtioBlock,
)
from kvmlet.virtio.blk_config import DiskConfig
from kvmlet.virtio.console import TRANSMIT_QUEUE, VirtioConsole
from kvmlet.virtio.device import (
    ACKNOWLEDGE,
    DEVICE_NEEDS_RESET,
    DRIVER,
    DRIVER_OK,
    FEATURES_OK,
    RingPart,
)
from kvmlet.virtio.queue import VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE
from kvmlet.virtio.worker import QueueWorker, doorbell
from tests.helpers.virtio_driver import MockDriver

QUEUE_SIZE = 8
DESCRIPTORS, AVAILABLE, USED = 0x1000, 0x2000, 0x3000
HEADER = AVAILABLE + 0x40  # inside the sector the read writes, as the available ring is
STATUS = 0x4000
REARMING_SECTORS = 1 << 16
"""One sector per value of the 16-bit available index, so the ring re-arms forever."""


def rearming_image(path) -> None:
    """Sector k holds, at the available ring's offsets, an index of k + 2 and, at the
    header's, a sector of k + 1: reading it posts the same chain again for the next sector."""
    image = bytearray(REARMING_SECTORS * SECTOR_SIZE)
    for sector in range(REARMING_SECTORS):
        base = sector * SECTOR_SIZE
        struct.pack_into("<H", image, base + 2, (sector + 2) & 0xFFFF)
        header = base + HEADER - AVAILABLE
        struct.pack_into("<IIQ", image, header, VIRTIO_BLK_T_IN, 0, (sector + 1) % REARMING_SECTORS)
    path.write_bytes(image)


def rearming_disk(memory: GuestMemory, path) -> tuple[VirtioBlock, MockDriver]:
    """A disk whose only posted request reads a sector over its own available ring."""
    rearming_image(path)
    device = VirtioBlock(memory, DiskConfig(str(path)))
    driver = MockDriver(device, memory, 0x10000, 1 << 20)
    driver.negotiate()
    device.set_queue_size(0, QUEUE_SIZE)
    for part, address in (
        (RingPart.DESCRIPTOR, DESCRIPTORS),
        (RingPart.DRIVER, AVAILABLE),
        (RingPart.DEVICE, USED),
    ):
        device.set_queue_address(0, part, address)
    device.set_queue_ready(0, True)
    descriptors = [
        (HEADER, 16, VIRTQ_DESC_F_NEXT, 1),
        (AVAILABLE, SECTOR_SIZE, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, 2),
        (STATUS, 1, VIRTQ_DESC_F_WRITE, 0),
    ]
    for index, descriptor in enumerate(descriptors):
        memory.write(DESCRIPTORS + 16 * index, struct.pack("<QIHH", *descriptor))
    memory.write(HEADER, struct.pack("<IIQ", VIRTIO_BLK_T_IN, 0, 0))
    memory.write_u16(AVAILABLE + 2, 1)  # head 0 in slot 0 (the ring is all zeroes)
    device.write_status(ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK)
    return device, driver


def break_the_loop(memory: GuestMemory) -> None:
    """Make the chain invalid, so a device still looping on it stops (NEEDS_RESET)."""
    memory.write(DESCRIPTORS, struct.pack("<QIHH", HEADER, 16, VIRTQ_DESC_F_NEXT, 999))


def in_thread(function, *args) -> threading.Thread:
    thread = threading.Thread(target=function, args=args, daemon=True)
    thread.start()
    return thread


def test_one_kick_of_a_self_rearming_ring_does_bounded_work(memory, tmp_path):
    device, _ = rearming_disk(memory, tmp_path / "rearm.img")
    try:
        kick = in_thread(device.notify, 0)
        kick.join(5)
        if kick.is_alive():
            break_the_loop(memory)
            kick.join(5)
            pytest.fail("one notify() served the re-arming ring for 5 s")
        served = device.queue_stats[0].requests
        assert 1 < served <= 1024, "one kick serves a bounded round, and the ring did re-arm"
        assert device.running
    finally:
        device.close()


def test_a_worker_busy_with_a_self_rearming_ring_stays_controllable(memory, tmp_path):
    device, _ = rearming_disk(memory, tmp_path / "rearm.img")
    bell = doorbell(device, 0)
    worker = QueueWorker("virtio-rearm")
    worker.add(bell)
    worker.start()
    try:
        bell.ring()
        deadline = time.monotonic() + 5
        while device.queue_stats[0].requests < 10_000 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert device.queue_stats[0].requests >= 10_000, "the guest's ring keeps re-arming"
        started = time.monotonic()
        stats = in_thread(device.stats)
        stats.join(2)
        assert not stats.is_alive(), "stats() waits for a busy device"
        stopped = worker.stop(timeout=2)
        assert stopped and time.monotonic() - started < 2, "the worker did not stop"
    finally:
        break_the_loop(memory)
        worker.stop()
        bell.close()
        device.close()


def test_a_kick_that_exits_to_the_vcpu_does_not_run_the_queue_there(memory, tmp_path):
    """A notify write KVM did not turn into an eventfd signal (a 4-byte kick on virtio-pci)
    reaches `notify()` on the vCPU thread: the worker serves the queue, the vCPU goes on."""
    device, _ = rearming_disk(memory, tmp_path / "rearm.img")
    bell = doorbell(device, 0)
    worker = QueueWorker("virtio-rearm")
    worker.add(bell)
    worker.start()
    try:
        vcpu = in_thread(device.notify, 0)
        vcpu.join(2)
        assert not vcpu.is_alive(), "the vCPU thread is serving the ring"
        deadline = time.monotonic() + 5
        while device.queue_stats[0].requests < 100 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert device.queue_stats[0].requests >= 100, "the worker serves the kick instead"
    finally:
        break_the_loop(memory)
        worker.stop()
        bell.close()
        device.close()


@pytest.fixture
def direct_disk(memory, tmp_path):
    path = tmp_path / "direct.img"
    path.write_bytes(bytes(range(256)) * 64)
    device = VirtioBlock(memory, DiskConfig(str(path), direct=True))
    driver = MockDriver(device, memory, 0x10000, 1 << 20)
    driver.initialize()
    yield device, driver
    device.close()


def post_read(driver: MockDriver, sector: int, data_sizes: list[int]) -> tuple[int, int]:
    """Post a read with data buffers of `data_sizes`; returns (head, status address)."""
    header = struct.pack("<IIQ", VIRTIO_BLK_T_IN, 0, sector)
    head, addresses = driver.post_data(0, [header], [*data_sizes, 1])
    return head, addresses[-1]


def test_a_zero_length_buffer_on_a_direct_disk_completes(direct_disk, memory):
    device, driver = direct_disk
    head, status = post_read(driver, 0, [0])
    driver.kick(0)
    assert [c.head for c in driver.collect(0)] == [head]
    assert memory.read_u8(status) == VIRTIO_BLK_S_OK
    head, status = post_read(driver, 0, [0, SECTOR_SIZE, 0])
    driver.kick(0)
    assert [c.head for c in driver.collect(0)] == [head]
    assert memory.read_u8(status) == VIRTIO_BLK_S_OK
    assert device.running and not driver.needs_reset


def test_a_device_bug_in_a_request_completes_it_with_ioerr(direct_disk, memory, monkeypatch):
    """Whatever goes wrong inside a request, the guest gets its request back, marked failed,
    and the device keeps serving the next one."""
    device, driver = direct_disk

    def broken(*args):
        raise ValueError("a bug in the data path")

    monkeypatch.setattr(device.image, "read_into", broken)
    monkeypatch.setattr(device.image, "read_iovec", broken)
    head, status = post_read(driver, 0, [SECTOR_SIZE])
    driver.kick(0)
    assert [c.head for c in driver.collect(0)] == [head]
    assert memory.read_u8(status) == VIRTIO_BLK_S_IOERR
    assert device.running and not driver.needs_reset
    monkeypatch.undo()
    head, status = post_read(driver, 1, [SECTOR_SIZE])
    driver.kick(0)
    assert [c.head for c in driver.collect(0)] == [head]
    assert memory.read_u8(status) == VIRTIO_BLK_S_OK


def test_aliasing_console_chains_move_bounded_bytes(tmp_path):
    """15 descriptors all pointing at the same 16 MiB: the console hands over at most its
    per-chain limit, not 240 MiB."""
    memory = GuestMemory.anonymous([(0, 32 << 20)])
    handed_over = []
    device = VirtioConsole(memory, lambda data: handed_over.append(len(data)))
    try:
        driver = MockDriver(device, memory, 0x1000, 1 << 20)
        driver.initialize()
        big = (16 << 20, 16 << 20)
        for _ in range(3):
            driver.post(TRANSMIT_QUEUE, [big] * 15, [])
        driver.kick(TRANSMIT_QUEUE)
        assert len(driver.collect(TRANSMIT_QUEUE)) == 3, "every chain still completes"
        assert sum(handed_over) <= 3 * (1 << 20)
        assert device.stats()["queues"][TRANSMIT_QUEUE]["bytes_from_guest"] == sum(handed_over)
    finally:
        device.close()
        memory.close()


def test_a_guest_breaking_its_device_in_a_loop_does_not_flood_the_log(memory, caplog):
    device = VirtioConsole(memory, lambda data: None)
    driver = MockDriver(device, memory, 0x1000, 1 << 20)
    caplog.set_level(logging.WARNING)
    for _ in range(2000):
        driver.initialize(queue_size=8)
        queue = driver.queues[TRANSMIT_QUEUE]
        driver.write_descriptor(queue, 0, 0x1000, 4, VIRTQ_DESC_F_NEXT, 99)  # a broken chain
        driver.make_available(queue, 0)
        driver.kick(TRANSMIT_QUEUE)
        assert device.status & DEVICE_NEEDS_RESET
    messages = [record.getMessage() for record in caplog.records]
    assert 1 <= len(messages) <= 11, f"{len(messages)} log lines for one guest's loop"
    device.close()
