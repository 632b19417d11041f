"""The machine's virtio devices served independently, and shut down safely, on a real VM.

The guest halts at once; the tests play the driver themselves in guest RAM (the mock driver of
the unit tests) and ring the devices through the machine's own doorbells, so the machine's
workers, irqfds and shutdown path are the real ones.
"""

from __future__ import annotations

import os
import threading
import time

import pytest

from kvmlet.bus import AccessSizes, IoRegion
from kvmlet.errors import KvmletError
from kvmlet.machine import vcpu_threads, virtio_devices
from kvmlet.machine.config import DiskConfig, MachineConfig
from kvmlet.machine.machine import Machine
from kvmlet.virtio.blk import VIRTIO_BLK_S_OK, VIRTIO_BLK_T_FLUSH
from tests.helpers.virtio_driver import MockDriver

pytestmark = pytest.mark.kvm

HALT = bytes.fromhex("fa f4")  # cli ; hlt
ARENA = 16 << 20
VIRTIO_FLUSH_HEADER = VIRTIO_BLK_T_FLUSH.to_bytes(4, "little") + bytes(12)


def wait_for(condition, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.002)
    return True


@pytest.fixture
def machine_with_disk_and_rng(tmp_path):
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(1 << 20))
    config = MachineConfig(boot_code=HALT, host_profile="none", disks=(DiskConfig(disk),))
    machine = Machine(config)
    yield machine
    machine.close()


def drivers(machine):
    """Mock drivers of the disk and the entropy device, in guest RAM above the boot code."""
    blk, rng = machine.virtio.devices
    blk_driver = MockDriver(blk, machine.memory, ARENA, 1 << 20, record_interrupts=False)
    rng_driver = MockDriver(rng, machine.memory, ARENA + (1 << 20), 1 << 20, False)
    blk_driver.initialize()
    rng_driver.initialize()
    return blk, blk_driver, rng, rng_driver


def stuck_flush(device, monkeypatch):
    """Make the disk's flushes wait for the returned event."""
    flushing, release = threading.Event(), threading.Event()

    def flush():
        flushing.set()
        release.wait(30)

    monkeypatch.setattr(device.image, "flush", flush)
    return flushing, release


def test_a_disk_stuck_in_a_flush_never_holds_up_the_entropy_device(
    machine_with_disk_and_rng, monkeypatch
):
    machine = machine_with_disk_and_rng
    machine.start()
    blk, blk_driver, rng, rng_driver = drivers(machine)
    flushing, release = stuck_flush(blk, monkeypatch)
    try:
        _, (status,) = blk_driver.post_data(0, [VIRTIO_FLUSH_HEADER], [1])
        blk.notify(0)  # through the machine's doorbell, as a kick that exited would
        assert flushing.wait(5)
        head, _ = rng_driver.post_data(0, [], [16])
        rng.notify(0)
        served = []
        assert wait_for(lambda: served.extend(rng_driver.collect(0)) or served), (
            "the entropy device waits for the disk's flush"
        )
        assert [c.head for c in served] == [head]
    finally:
        release.set()
    assert wait_for(lambda: machine.memory.read_u8(status) == VIRTIO_BLK_S_OK)


def test_closing_with_a_transfer_stuck_leaves_what_it_uses_open(
    machine_with_disk_and_rng, monkeypatch
):
    machine = machine_with_disk_and_rng
    monkeypatch.setattr(virtio_devices, "WORKER_STOP_TIMEOUT", 0.2)
    machine.start()
    blk, blk_driver, _, _ = drivers(machine)
    flushing, release = stuck_flush(blk, monkeypatch)
    blk_driver.post_data(0, [VIRTIO_FLUSH_HEADER], [1])
    blk.notify(0)
    assert flushing.wait(5)
    doorbells = [bell.eventfd for bell in machine.virtio._doorbells]
    machine.close()
    try:
        for fd in doorbells:
            os.fstat(fd)  # still open: no other file can get these numbers
        assert blk.image.fd >= 0
        assert machine.virtio.left_open
    finally:
        release.set()
    assert wait_for(lambda: machine.virtio.close(), timeout=10)
    assert all(bell.eventfd == -1 for bell in machine.virtio._doorbells)


class Blocking:
    """Registers whose read waits for `release` (a device handler stuck on the vCPU)."""

    def __init__(self):
        self.entered, self.release = threading.Event(), threading.Event()

    def read(self, offset, size):
        self.entered.set()
        self.release.wait(30)
        return 0

    def write(self, offset, size, value):
        pass


def test_closing_with_a_vcpu_stuck_in_a_handler_closes_nothing_it_uses(monkeypatch):
    # mov ax, 0xd000 ; mov ds, ax ; mov al, [0] ; cli ; hlt
    code = bytes.fromhex("b800d0 8ed8 a00000 fa f4")
    machine = Machine(MachineConfig(boot_code=code, rng=False, host_profile="none"))
    device = Blocking()
    region = IoRegion("stuck", 0x1000, device, valid=AccessSizes(1, 4), impl=AccessSizes(1, 4))
    machine.mmio.root.add_subregion(0xD0000, region, priority=1)
    monkeypatch.setattr(vcpu_threads, "VCPU_STOP_TIMEOUT", 0.3)
    machine.start()
    try:
        assert device.entered.wait(10)
        machine.close()
        vcpu = machine.vcpus[0]
        assert vcpu.fd >= 0 and machine.vm.fd >= 0, "closed under a running vCPU thread"
    finally:
        device.release.set()
    assert wait_for(lambda: not machine.vcpu_threads.threads[0].is_alive(), timeout=10)
    machine.close()
    assert machine.vcpus[0].fd == -1 and machine.vm.fd == -1


def test_a_pause_holds_every_devices_worker_and_waits_for_a_busy_one(
    machine_with_disk_and_rng, monkeypatch
):
    """The machine pauses only when each device's worker holds between rounds: a disk stuck in
    a flush makes the pause fail (the guest runs on); once it is done, every worker holds and
    kicks wait until resume."""
    machine = machine_with_disk_and_rng
    machine.start()
    blk, blk_driver, rng, rng_driver = drivers(machine)
    flushing, release = stuck_flush(blk, monkeypatch)
    try:
        blk_driver.post_data(0, [VIRTIO_FLUSH_HEADER], [1])
        blk.notify(0)
        assert flushing.wait(5)
        with pytest.raises(KvmletError, match="a device stayed busy"):
            machine.pause(timeout=0.3)
        assert machine.state == "running"
    finally:
        release.set()
    assert wait_for(lambda: blk_driver.collect(0))
    machine.pause(timeout=5)
    try:
        assert all(worker._parked for worker in machine.virtio.workers)
        rng_driver.post_data(0, [], [16])
        rng.notify(0)
        time.sleep(0.1)
        assert rng_driver.collect(0) == [], "a paused machine's device took a request"
    finally:
        machine.resume()
    served = []
    assert wait_for(lambda: served.extend(rng_driver.collect(0)) or served)
