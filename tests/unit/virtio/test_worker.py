"""QueueWorker: eventfd doorbells wake a thread that runs the devices' queues."""

from __future__ import annotations

import os
import socket
import threading
import time

import pytest

from kvmlet.virtio.device import DEVICE_NEEDS_RESET
from kvmlet.virtio.rng import VirtioRng
from kvmlet.virtio.worker import QueueWorker, doorbell, new_eventfd, workers_per_device
from tests.helpers.virtio_driver import MockDriver


def wait_for(condition, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.001)


class ExplodingRng(VirtioRng):
    """A device with a bug: serving its queue raises something the device does not guard."""

    def serve(self, queue_index, lend_hand=None):
        raise RuntimeError("device bug")


@pytest.fixture
def worker():
    worker = QueueWorker()
    yield worker
    worker.stop()


def started_rng(memory, arena):
    device = VirtioRng(memory)
    driver = MockDriver(device, memory, arena, 1 << 18)
    driver.initialize(queue_size=8)
    return device, driver


def test_an_eventfd_write_makes_the_device_process_its_queue(memory, worker):
    device, driver = started_rng(memory, 0x10000)
    bell = doorbell(device, 0)
    worker.add(bell)
    worker.start()
    head, _ = driver.post_data(0, [], [32])
    os.eventfd_write(bell.eventfd, 2)  # two guest kicks the worker had not seen yet
    wait_for(lambda: device.queue_stats[0].requests == 1)
    assert [c.head for c in driver.collect(0)] == [head]
    assert (bell.wakeups, bell.kicks, worker.notifications) == (1, 2, 1)
    bell.close()


def test_one_worker_serves_several_devices_and_survives_a_failing_one(memory, worker):
    good, good_driver = started_rng(memory, 0x10000)
    bad = ExplodingRng(memory)
    MockDriver(bad, memory, 0x80000, 1 << 18).initialize(queue_size=8)
    bells = [doorbell(good, 0), doorbell(bad, 0)]
    for bell in bells:
        worker.add(bell)
    worker.start()
    bells[1].ring()
    wait_for(lambda: worker.device_errors == 1)
    assert bad.status & DEVICE_NEEDS_RESET and "device bug" in bad.last_error
    good_driver.post_data(0, [], [16])
    bells[0].ring()
    wait_for(lambda: good.queue_stats[0].requests == 1)
    assert worker.stats()["device_errors"] == 1
    for bell in bells:
        bell.close()


def test_watched_descriptors_call_back_on_the_worker_thread(worker):
    fd = new_eventfd()
    seen = []
    worker.watch(fd, lambda: seen.append(threading.current_thread().name))
    worker.start()
    os.eventfd_write(fd, 1)
    wait_for(lambda: seen)
    assert seen == [worker.name]
    os.close(fd)


def test_stop_wakes_an_idle_worker_promptly():
    worker = QueueWorker()
    worker.start()
    started = time.monotonic()
    worker.stop()
    assert time.monotonic() - started < 1.0
    assert not worker._thread.is_alive()
    worker.stop()  # a second stop is harmless


def test_one_worker_per_device(memory):
    first, _ = started_rng(memory, 0x10000)
    second, _ = started_rng(memory, 0x80000)
    bells = [doorbell(first, 0), doorbell(second, 0)]
    workers = workers_per_device(bells)
    assert [w.doorbells for w in workers] == [[bells[0]], [bells[1]]]
    for worker in workers:
        worker.stop()
    for bell in bells:
        bell.close()


def test_a_paused_worker_serves_nothing_until_resumed(memory, worker):
    device, driver = started_rng(memory, 0x10000)
    bell = doorbell(device, 0)
    worker.add(bell)
    worker.start()
    assert worker.pause(timeout=2)
    driver.post_data(0, [], [32])
    bell.ring()
    bell.ring()
    time.sleep(0.1)
    assert device.queue_stats[0].requests == 0  # the kicks wait in the eventfd
    worker.resume()
    wait_for(lambda: device.queue_stats[0].requests == 1)
    assert bell.kicks == 2
    bell.close()


def test_a_paused_worker_still_stops(memory):
    worker = QueueWorker()
    worker.start()
    assert worker.pause(timeout=2)
    worker.stop(timeout=2)
    assert not worker._thread.is_alive()


def test_pausing_a_worker_busy_in_a_device_times_out(memory, worker):
    release = threading.Event()

    class SlowRng(VirtioRng):
        def handle_request(self, request):
            release.wait(5)
            return 0

    device = SlowRng(memory)
    driver = MockDriver(device, memory, 0x10000, 1 << 18)
    driver.initialize(queue_size=8)
    bell = doorbell(device, 0)
    worker.add(bell)
    worker.start()
    driver.post_data(0, [], [32])
    bell.ring()
    wait_for(lambda: worker.notifications == 1)
    assert not worker.pause(timeout=0.1)
    release.set()
    wait_for(lambda: worker._parked)  # it still pauses once the device is done
    worker.resume()
    bell.close()


class BlockingRng(VirtioRng):
    """Requests that wait on the host until released, served on two threads at once."""

    concurrency = 2

    def __init__(self, memory):
        super().__init__(memory)
        self.entered = threading.Semaphore(0)
        self.release = threading.Event()

    def may_block(self, chain):
        return True

    def handle_request(self, request):
        self.entered.release()
        self.release.wait(5)
        return 0


def test_a_pause_waits_for_the_helper_threads_rounds_too(memory):
    device = BlockingRng(memory)
    driver = MockDriver(device, memory, 0x10000, 1 << 18)
    driver.initialize(queue_size=8)
    bell = doorbell(device, 0)
    worker = QueueWorker("blocking", device.concurrency)
    worker.add(bell)
    worker.start()
    try:
        driver.post_data(0, [], [32])
        driver.post_data(0, [], [32])
        bell.ring()
        for _ in range(2):  # the poller and its helper, each inside a request
            assert device.entered.acquire(timeout=5)
        assert worker.hands_lent == 1
        assert not worker.pause(timeout=0.1)
        device.release.set()
        assert worker.pause(timeout=5)
        assert device.queue_stats[0].requests == 2
        driver.post_data(0, [], [32])
        bell.ring()
        time.sleep(0.1)
        assert device.queue_stats[0].requests == 2, "a paused worker takes no request"
        worker.resume()
        wait_for(lambda: device.queue_stats[0].requests == 3)
    finally:
        device.release.set()
        worker.stop()
        bell.close()


def test_a_pause_waits_for_requests_completed_later(memory, worker):
    """A request the device completes on a thread of its own (DEFERRED) still touches guest
    memory: the worker is not paused until it is done."""
    from kvmlet.virtio.serving import DEFERRED

    taken = []

    class DeferringRng(VirtioRng):
        def handle_request(self, request):
            taken.append(request)
            return DEFERRED

    device = DeferringRng(memory)
    driver = MockDriver(device, memory, 0x10000, 1 << 18)
    driver.initialize(queue_size=8)
    bell = doorbell(device, 0)
    worker.add(bell)
    worker.start()
    driver.post_data(0, [], [32])
    bell.ring()
    wait_for(lambda: taken)
    assert not worker.pause(timeout=0.1)
    taken[0].complete(0)
    assert worker.pause(timeout=2)
    assert [chain.length for chain in driver.collect(0)] == [0]
    worker.resume()
    bell.close()


def test_a_readiness_watch_calls_back_only_for_what_its_owner_wants(worker):
    ours, peer = socket.socketpair()
    calls = []
    watch = worker.watch_readiness(ours.fileno(), lambda *ready: calls.append(ready))
    worker.start()
    peer.send(b"x")
    time.sleep(0.05)
    assert calls == []  # nothing wanted yet
    watch.want(readable=True, writable=False)
    wait_for(lambda: calls)
    assert calls[0] == (True, False, False)
    watch.want(readable=False, writable=False)
    time.sleep(0.02)  # a call already under way when the owner paused
    settled = len(calls)
    time.sleep(0.05)
    assert len(calls) == settled  # paused: still readable, but not called
    peer.close()
    wait_for(lambda: calls[-1][2])  # a hang-up is reported even while nothing is wanted
    watch.close()
    time.sleep(0.02)
    settled = len(calls)
    time.sleep(0.05)
    assert len(calls) == settled
    ours.close()


def test_a_failing_readiness_callback_is_counted_and_unwatched(worker):
    ours, peer = socket.socketpair()

    def broken(readable, writable, hangup):
        raise RuntimeError("backend bug")

    watch = worker.watch_readiness(ours.fileno(), broken)
    watch.want(readable=False, writable=True)
    worker.start()
    wait_for(lambda: worker.device_errors == 1)
    time.sleep(0.05)
    assert worker.device_errors == 1  # a level-triggered descriptor is not polled again
    ours.close()
    peer.close()
