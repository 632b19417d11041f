"""A device's context and worker: guest memory bounds, regions under the device lock, jobs off
the calling thread with their completion under the lock, failures counted, orderly close."""

from __future__ import annotations

import threading
import time

import pytest

from kvmlet.bus import port_io_space
from kvmlet.devices import (
    Device,
    DeviceContext,
    GuestMemoryError,
    Register,
    RegisterDevice,
    test_context,
)
from kvmlet.memory import GuestMemory


@pytest.fixture
def memory():
    guest = GuestMemory.anonymous([(0, 1 << 16)])
    yield guest
    guest.close()


def test_device_memory_is_bounds_checked_and_typed(memory):
    context = DeviceContext("d", memory)
    context.memory.write_u32(0x100, 0x1122_3344)
    context.memory.write_u64(0x108, 1 << 63)
    context.memory.write_u16(0x110, 0xABCD)
    context.memory.write_u8(0x112, 0x1FF)
    assert context.memory.read(0x100, 4) == bytes.fromhex("44332211")
    assert context.memory.read_u32(0x100) == 0x1122_3344
    assert context.memory.read_u64(0x108) == 1 << 63
    assert (context.memory.read_u16(0x110), context.memory.read_u8(0x112)) == (0xABCD, 0xFF)
    with pytest.raises(GuestMemoryError):
        context.memory.read(0xFFF0, 0x20)
    with pytest.raises(GuestMemoryError):
        context.memory.write(1 << 20, b"x")


class Echo(Device):
    """Registers of a plain Device: reads return the last write, under the bus's lock."""

    def __init__(self, context):
        super().__init__(context, 4)
        self.value = 0
        self.lock_held = []

    def read(self, offset, size):
        return self.value

    def write(self, offset, size, value):
        self.lock_held.append(self.context.lock._is_owned())
        self.value = value


def test_a_devices_region_is_named_after_it_and_held_under_its_lock(memory):
    device = Echo(DeviceContext("echo", memory))
    region = device.region()
    assert (region.name, region.size, region.lock) == ("echo", 4, device.context.lock)
    space = port_io_space()
    space.root.add_subregion(0x500, region)
    space.write(0x500, 4, 7)
    assert space.read(0x500, 4) == 7 and device.lock_held == [True]


def test_device_size_must_be_positive(memory):
    with pytest.raises(ValueError, match="size must be positive"):
        Device(DeviceContext("bad", memory), 0)


class Slow(RegisterDevice):
    """A write to GO submits a job whose work runs off the lock and whose done runs on it."""

    def __init__(self, context):
        super().__init__(context, 8, [Register("go", 0, on_write=self.go), Register("out", 4)])
        self.worker = context.worker()
        self.threads = []
        self.release = threading.Event()

    def go(self, value):
        self.worker.submit(lambda: self.work(value), self.done)

    def work(self, value):
        self.threads.append(("work", threading.current_thread().name))
        self.release.wait(10)
        if value == 0xBAD:
            raise RuntimeError("bad job")
        return value * 2

    def done(self, result):
        self.threads.append(("done", self.context.lock._is_owned()))
        self["out"] = result


def test_a_threaded_worker_runs_jobs_in_order_after_start(memory):
    context = DeviceContext("slow", memory)
    device = Slow(context)
    device.write(0, 4, 1)  # before start: queued
    context.start()
    device.write(0, 4, 2)
    assert device["out"] == 0  # the vCPU did not wait for the job
    device.release.set()
    assert device.worker.drain()
    assert device["out"] == 4
    assert device.threads == [("work", "slow-worker0"), ("done", True)] * 2
    assert (device.worker.submitted, device.worker.completed, device.worker.errors) == (2, 2, 0)
    context.close()
    assert device.worker._thread is None


def test_a_failing_job_is_counted_and_skips_its_completion(memory, caplog):
    context = DeviceContext("slow", memory)
    device = Slow(context)
    context.start()
    device.release.set()
    device.write(0, 4, 0xBAD)
    device.write(0, 4, 3)
    assert device.worker.drain()
    assert device["out"] == 6
    assert device.worker.errors == 1 and device.worker.completed == 2
    assert "slow-worker0: job 1 failed" in caplog.text
    context.close()


def test_a_worker_made_after_start_runs_at_once_and_job_numbers_are_per_device(memory):
    context = DeviceContext("d", memory)
    context.start()
    first, second = context.worker(), context.worker()
    numbers = [first.submit(lambda: None), second.submit(lambda: None), first.submit(lambda: 1)]
    assert numbers == [1, 2, 3]
    assert first.drain() and second.drain()
    context.close()


def test_the_test_context_runs_jobs_inline_with_a_recording_line():
    context = test_context("slow")
    device = Slow(context)
    device.release.set()
    device.write(0, 4, 5)
    assert device["out"] == 10 and device.threads[0] == ("work", "MainThread")
    context.irq.set_level(True)
    assert context.irq.history == [True]
    assert context.memory.read(0, 4) == bytes(4)


def test_a_sleeping_job_ends_when_the_machine_closes(memory):
    context = DeviceContext("timer", memory)
    worker = context.worker()
    context.start()
    finished = []
    worker.submit(lambda: worker.sleep(30), finished.append)
    started = time.monotonic()
    time.sleep(0.05)
    context.close()
    assert time.monotonic() - started < 5
    assert finished == [] and worker.errors == 0 and worker.completed == 0


def test_in_a_replay_sleeping_returns_at_once(memory):
    class Replaying:
        replaying = True

    worker = DeviceContext("timer", memory, journal=Replaying()).worker()
    started = time.monotonic()
    worker.sleep(30)
    assert time.monotonic() - started < 1
