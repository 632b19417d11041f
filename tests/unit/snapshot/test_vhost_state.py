"""A vhost-user device across a snapshot: the ring positions come back from the backend with
GET_VRING_BASE, go through the snapshot file, and reach a new backend with SET_VRING_BASE;
shareable guest RAM goes through the file into fresh memfds; device types whose backend keeps
state of its own are refused.
"""

from __future__ import annotations

import copy
import os
import socket
import time

import pytest

from kvmlet.errors import KvmletError
from kvmlet.memory import GuestMemory
from kvmlet.snapshot import codec, ram
from kvmlet.vhost.device import VhostDevice
from kvmlet.vhost.user import VhostUserFrontend
from kvmlet.virtio.device import InterruptKind
from kvmlet.virtio.worker import QueueWorker
from tests.helpers.vhost_user_backend import PythonBackend
from tests.helpers.virtio_driver import GUEST_RAM_SIZE, MockDriver


class Backed:
    """A VhostDevice over `memory` with a Python vhost-user backend and a worker relaying
    its call eventfds."""

    def __init__(self, memory: GuestMemory, device_id: int = 2):
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.backend = PythonBackend(theirs).start()
        frontend = VhostUserFrontend(ours, name="python-backend", timeout=3.0)
        self.device = VhostDevice(
            memory, frontend, name="vhost-blk", device_id=device_id, queue_sizes=[16, 16]
        )
        self.worker = QueueWorker("vhost")
        self.device.connect_worker(self.worker)
        self.worker.start()

    def close(self) -> None:
        self.worker.stop()
        self.device.close()
        self.backend.stop()


def serve(driver: MockDriver, device: VhostDevice, data: bytes) -> list:
    """One request through the backend (kicked as KVM would), its completions."""
    _, (answer,) = driver.post_data(0, [data], [len(data)])
    interrupts = driver.interrupts.count((InterruptKind.QUEUE, 0))
    os.eventfd_write(device.kick_eventfd(0), 1)
    deadline = time.monotonic() + 5
    while driver.interrupts.count((InterruptKind.QUEUE, 0)) == interrupts:
        assert time.monotonic() < deadline, "the backend did not answer"
        time.sleep(0.002)
    assert driver.memory.read(answer, len(data)) == data[::-1]
    return [(completion.head, completion.length) for completion in driver.collect(0)]


def test_ring_positions_and_shareable_ram_reach_a_new_backend(tmp_path):
    memory = GuestMemory.memfd([(0, GUEST_RAM_SIZE)])
    first = Backed(memory)
    driver = MockDriver(first.device, memory, 0x10000, 1 << 20)
    driver.initialize()
    for number in range(3):
        serve(driver, first.device, f"request {number}".encode())
    first.device.pause_backend()
    assert first.backend.names()[-2:] == ["GET_VRING_BASE", "GET_VRING_BASE"]
    state = codec.decode(codec.encode(first.device.save_state()))
    assert state["queues"][0]["last_available"] == state["queues"][0]["used_index"] == 3
    assert state["backend_rings"] == [0, 1]
    # Guest RAM through a snapshot file into fresh memfds, as a restore does for shared RAM.
    fd = os.open(tmp_path / "ram.snap", os.O_RDWR | os.O_CREAT, 0o600)
    os.ftruncate(fd, ram.PAGE + GUEST_RAM_SIZE)
    ram.save_bank(fd, ram.PAGE, memory.banks[0])
    restored = GuestMemory.memfd([(0, GUEST_RAM_SIZE)])
    ram.load_bank(fd, ram.PAGE, restored.banks[0])
    os.close(fd)
    second = Backed(restored)
    try:
        second.device.load_state(state)
        assert second.backend.vrings[0].base == 3 and second.backend.vrings[0].enabled
        twin = copy.copy(driver)
        twin.device, twin.memory, twin.interrupts = second.device, restored, []
        twin.queues = copy.deepcopy(driver.queues)
        second.device.connect_interrupts(lambda kind, queue: twin.interrupts.append((kind, queue)))
        (completion,) = serve(twin, second.device, b"after the restore")
        assert second.backend.vrings[0].served == [b"after the restore"]
        assert restored.read_u16(twin.queues[0].used_ring + 2) == 4
        # The original machine, resumed, goes on with its own backend from the same place.
        first.device.resume_backend()
        assert first.backend.vrings[0].base == 3
        assert serve(driver, first.device, b"original goes on!") == [completion]
    finally:
        for each in (first, second):
            each.close()
        memory.close()
        restored.close()


def test_a_backend_still_running_its_rings_is_not_saved():
    memory = GuestMemory.memfd([(0, GUEST_RAM_SIZE)])
    backed = Backed(memory)
    try:
        MockDriver(backed.device, memory, 0x10000, 1 << 20).initialize()
        with pytest.raises(KvmletError, match="pause the backend first"):
            backed.device.save_state()
    finally:
        backed.close()
        memory.close()


@pytest.mark.parametrize("device_id", [19, 26])  # vsock, fs
def test_a_backend_with_state_of_its_own_is_refused(device_id):
    memory = GuestMemory.memfd([(0, GUEST_RAM_SIZE)])
    backed = Backed(memory, device_id)
    try:
        with pytest.raises(KvmletError, match="lives outside kvmlet and cannot be saved"):
            backed.device.save_state()
    finally:
        backed.close()
        memory.close()


def test_a_restored_device_signals_each_ring_once_so_no_completion_goes_unnoticed():
    """A completion the old backend signalled while its machine was paused waited in a call
    eventfd of the old process; the restored device raises each ring's interrupt once."""
    memory = GuestMemory.memfd([(0, GUEST_RAM_SIZE)])
    first = Backed(memory)
    second = Backed(memory)
    try:
        driver = MockDriver(first.device, memory, 0x10000, 1 << 20)
        driver.initialize()
        serve(driver, first.device, b"one request")
        first.device.pause_backend()
        state = first.device.save_state()
        interrupts = []
        second.device.connect_interrupts(lambda kind, queue: interrupts.append((kind, queue)))
        second.device.load_state(state)
        deadline = time.monotonic() + 5
        while len(interrupts) < 2:
            assert time.monotonic() < deadline, f"interrupts: {interrupts}"
            time.sleep(0.002)
        time.sleep(0.05)
        assert sorted(interrupts) == [(InterruptKind.QUEUE, 0), (InterruptKind.QUEUE, 1)]
        assert second.backend.vrings[0].served == [], "the backend served nothing"
    finally:
        for each in (first, second):
            each.close()
        memory.close()
