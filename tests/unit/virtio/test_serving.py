"""How devices are served: register accesses never wait for host I/O, a disk keeps several
requests in flight and completes them out of order, and shutdown never lets a transfer that is
still running touch a file descriptor that was closed (and maybe reused) under it."""

from __future__ import annotations

import os
import struct
import threading
import time

import pytest

from kvmlet.virtio.blk import (
    SECTOR_SIZE,
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
    VirtioBlock,
)
from kvmlet.virtio.blk_config import DiskConfig
from kvmlet.virtio.rng import VirtioRng
from kvmlet.virtio.serving import DEFERRED
from kvmlet.virtio.worker import QueueWorker, doorbell
from tests.helpers.virtio_driver import MockDriver

WORKER_NAME = "virtio-test-disk"


def wait_for(condition, timeout=5.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not met within {timeout} s")
        time.sleep(0.001)


class ServedDisk:
    """A virtio-blk device on a started worker, as the machine runs it, with its mock driver."""

    def __init__(self, memory, path, threads: int = 4, direct: bool = False):
        self.memory = memory
        self.device = VirtioBlock(memory, DiskConfig(str(path), direct=direct))
        self.driver = MockDriver(self.device, memory, 0x10000, 2 << 20)
        self.driver.initialize()
        self.bell = doorbell(self.device, 0)
        self.worker = QueueWorker(WORKER_NAME, threads=threads)
        self.worker.add(self.bell)
        self.worker.start()

    def post(self, request_type: int, sector: int = 0, data: bytes = b"", read: int = 0):
        """Post a request; returns (head, status address)."""
        header = struct.pack("<IIQ", request_type, 0, sector)
        out = [header] + ([data] if data else [])
        head, addresses = self.driver.post_data(0, out, ([read] if read else []) + [1])
        return head, addresses[-1]

    def completions(self, count: int, timeout: float = 5.0) -> list[int]:
        done: list[int] = []

        def collected():
            done.extend(c.head for c in self.driver.collect(0))
            return len(done) >= count

        wait_for(collected, timeout, f"{count} completions")
        return done

    def close(self) -> None:
        self.worker.stop()
        self.bell.close()
        self.device.close()


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(64 * SECTOR_SIZE))
    return path


def in_thread(function, *args) -> threading.Thread:
    thread = threading.Thread(target=function, args=args, daemon=True)
    thread.start()
    return thread


def test_register_accesses_do_not_wait_for_a_flush(memory, image, monkeypatch):
    disk = ServedDisk(memory, image)
    flushing, release = threading.Event(), threading.Event()

    def slow_flush():
        flushing.set()
        release.wait(10)

    monkeypatch.setattr(disk.device.image, "flush", slow_flush)
    try:
        head, status = disk.post(VIRTIO_BLK_T_FLUSH)
        disk.bell.ring()
        assert flushing.wait(5)
        device = disk.device

        def vcpu_accesses():
            device.read_config(0, 8)
            device.queue_ready(0)
            device.write_status(device.status)
            device.stats()

        vcpu = in_thread(vcpu_accesses)
        vcpu.join(1)
        assert not vcpu.is_alive(), "a vCPU's register access waits for the flush"
        release.set()
        assert disk.completions(1) == [head]
        assert memory.read_u8(status) == VIRTIO_BLK_S_OK
    finally:
        release.set()
        disk.close()


def test_a_slow_disk_keeps_several_requests_in_flight_and_completes_out_of_order(
    memory, image, monkeypatch
):
    """Direct I/O waits on the disk (virtio-blk's `may_block`): the requests behind one are
    taken by other threads, three are inside the disk at once, and the one that waits longest
    completes last."""
    disk = ServedDisk(memory, image, direct=True)
    real_read = disk.device.image.read_into
    together = threading.Barrier(3, timeout=5)
    used_index = disk.driver.queues[0].used_ring + 2

    def slow_read(views, offset, length):
        together.wait()  # three requests inside the disk at the same time
        if offset == 0:  # the first one posted finishes after the other two
            wait_for(lambda: memory.read_u16(used_index) == 2, what="two completions")
        return real_read(views, offset, length)

    monkeypatch.setattr(disk.device.image, "read_into", slow_read)
    try:
        posted = [disk.post(VIRTIO_BLK_T_IN, sector, read=SECTOR_SIZE) for sector in (0, 1, 2)]
        disk.bell.ring()
        order = disk.completions(3)
        assert sorted(order) == sorted(head for head, _ in posted)
        assert order[-1] == posted[0][0], "the request that waited completes last"
        assert all(memory.read_u8(status) == VIRTIO_BLK_S_OK for _, status in posted)
    finally:
        disk.close()


def test_buffered_requests_stay_on_one_thread(memory, image):
    """Page-cache requests are faster than a thread handoff: no helper is woken for them."""
    disk = ServedDisk(memory, image)
    try:
        for sector in range(16):
            disk.post(VIRTIO_BLK_T_IN, sector, read=SECTOR_SIZE)
        disk.bell.ring()
        disk.completions(16)
        assert disk.worker.stats()["hands_lent"] == 0
        disk.post(VIRTIO_BLK_T_FLUSH)
        disk.post(VIRTIO_BLK_T_IN, 0, read=SECTOR_SIZE)
        disk.bell.ring()
        disk.completions(2)
        assert disk.worker.stats()["hands_lent"] == 1, "a flush may block: a hand behind it"
    finally:
        disk.close()


def test_closing_a_disk_never_lets_a_running_transfer_write_elsewhere(
    memory, image, tmp_path, monkeypatch
):
    """The worker is stuck in a write when the machine shuts down: the image stays open until
    the write returns, so the file descriptor number cannot be reused for another file."""
    disk = ServedDisk(memory, image, threads=1)
    writing, release = threading.Event(), threading.Event()
    real_pwritev = os.pwritev

    def stuck_pwritev(fd, buffers, offset):
        if threading.current_thread().name.startswith(WORKER_NAME):
            writing.set()
            release.wait(30)
        return real_pwritev(fd, buffers, offset)

    monkeypatch.setattr(os, "pwritev", stuck_pwritev)
    others: list[int] = []
    try:
        disk.post(VIRTIO_BLK_T_OUT, 0, data=b"\xaa" * SECTOR_SIZE)
        disk.bell.ring()
        assert writing.wait(5)
        image_fd = disk.device.image.fd
        assert not disk.worker.stop(timeout=0.2), "the worker is still in the write"
        closing = in_thread(disk.device.close)
        closing.join(2)
        assert not closing.is_alive(), "closing the device waits for the transfer"
        for index in range(64):  # whatever number the host hands out next, the image's too
            others.append(os.open(tmp_path / f"other{index}", os.O_RDWR | os.O_CREAT))
            if others[-1] == image_fd:
                break
        release.set()
        written = b"\xaa" * SECTOR_SIZE

        def landed() -> bool:
            moved = any(os.fstat(fd).st_size for fd in others)
            return moved or image.read_bytes()[:SECTOR_SIZE] == written

        wait_for(landed, what="the guest's write")
        assert [os.fstat(fd).st_size for fd in others] == [0] * len(others), "written elsewhere"
        assert image.read_bytes()[:SECTOR_SIZE] == written
        assert disk.worker.stop(timeout=5)
    finally:
        release.set()
        for fd in others:
            os.close(fd)
        disk.close()


class LaterDevice(VirtioRng):
    """A device that completes its requests later, from another thread (as a 9p server or a
    network backend would): handle_request keeps them and says DEFERRED."""

    def __init__(self, memory):
        super().__init__(memory)
        self.kept = []

    def handle_request(self, request):
        self.kept.append(request)
        return DEFERRED


def test_deferred_requests_complete_from_any_thread_in_any_order_exactly_once(memory):
    device = LaterDevice(memory)
    driver = MockDriver(device, memory, 0x1000, 1 << 20)
    driver.initialize()
    heads = [driver.post_data(0, [], [8])[0] for _ in range(3)]
    driver.kick(0)
    assert driver.collect(0) == [] and len(device.kept) == 3
    first, second, third = device.kept
    completer = threading.Thread(target=lambda: (third.complete(8), first.complete(2)))
    completer.start()
    completer.join()
    assert [(c.head, c.length) for c in driver.collect(0)] == [(heads[2], 8), (heads[0], 2)]
    third.complete(8)  # a second completion is ignored
    assert driver.collect(0) == []
    assert device.queues[0].in_flight == 1
    used_index = memory.read_u16(driver.queues[0].used_ring + 2)
    reset = threading.Thread(target=device.write_status, args=(0,), daemon=True)
    reset.start()  # the reset stops the queue, then waits for the request in flight ...
    wait_for(lambda: not device.queues[0].active, what="the reset")
    second.complete(8)  # ... which is then dropped, not pushed for a driver that is gone
    reset.join(5)
    assert not reset.is_alive() and device.status == 0
    assert memory.read_u16(driver.queues[0].used_ring + 2) == used_index
    assert device.queues[0].in_flight == 0


def test_a_reset_waits_for_requests_in_flight(memory):
    device = LaterDevice(memory)
    driver = MockDriver(device, memory, 0x1000, 1 << 20)
    driver.initialize()
    driver.post_data(0, [], [8])
    driver.kick(0)
    (kept,) = device.kept
    reset = threading.Thread(target=device.write_status, args=(0,), daemon=True)
    reset.start()
    reset.join(0.3)
    assert reset.is_alive(), "the reset completed with a request still in flight"
    kept.complete(8)
    reset.join(5)
    assert not reset.is_alive() and device.status == 0
