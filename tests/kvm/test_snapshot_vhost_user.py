"""A machine with a vhost-user disk (qemu-storage-daemon) snapshotted and restored (issue 16).

The guest halts at once; the test plays the disk's driver in guest RAM (the unit tests' mock
driver) and rings the queue's kick eventfd as KVM does on the guest's notify write, so the
daemon, the machine's wiring and its pause are the real ones. Before the snapshot the daemon
served some requests and one more was made available but not kicked; the snapshot pauses the
machine (the daemon gives its ring back: GET_VRING_BASE) and stops it. The restored machine
must have its RAM in fresh memfds holding the snapshot's bytes, give the daemon those memfds
(SET_MEM_TABLE) and the ring from where it stopped (SET_VRING_BASE), and the daemon must then
serve the pending request and new ones, in the restored RAM, and nothing twice.
"""

from __future__ import annotations

import copy
import os
import struct
import time

import pytest

from kvmlet.errors import KvmletError
from kvmlet.machine.config import MachineConfig
from kvmlet.machine.machine import Machine
from kvmlet.machine.vhost_config import VhostUserDiskConfig
from kvmlet.vhost.user import VhostUserFrontend
from kvmlet.virtio.blk import VIRTIO_BLK_S_OK, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT
from tests.helpers.storage_daemon import STORAGE_DAEMON, storage_daemon
from tests.helpers.virtio_driver import MockDriver

pytestmark = [
    pytest.mark.kvm,
    pytest.mark.skipif(STORAGE_DAEMON is None, reason="needs qemu-storage-daemon (qemu-system)"),
]

HALT = bytes.fromhex("fa f4")  # cli ; hlt
ARENA = 16 << 20
SECTOR = 512
HEADER = struct.Struct("<IIQ")
IMAGE = bytes(range(256)) * ((1 << 20) // 256)


class Disk:
    """The mock driver of a machine's vhost-user disk: post, kick, wait for completions."""

    def __init__(self, machine: Machine, driver: MockDriver | None = None):
        self.machine = machine
        (self.device,) = machine.virtio.devices
        if driver is None:
            driver = MockDriver(self.device, machine.memory, ARENA, 1 << 20, False)
            driver.initialize()
        self.driver = driver

    def post(self, kind: int, sector: int, data: bytes = b"", read: int = 0):
        """Make one request available (not kicked): its head, data buffer and status byte."""
        out = [HEADER.pack(kind, 0, sector), *([data] if data else [])]
        head, writable = self.driver.post_data(0, out, [read, 1] if read else [1])
        return head, writable[0], writable[-1]

    def kick_and_collect(self, count: int) -> list[int]:
        """Ring the doorbell as KVM would and wait for `count` completions (their heads)."""
        os.eventfd_write(self.device.kick_eventfd(0), 1)
        heads: list[int] = []
        deadline = time.monotonic() + 30
        while len(heads) < count:
            assert time.monotonic() < deadline, f"{len(heads)} of {count} requests served"
            heads += [completion.head for completion in self.driver.collect(0)]
            time.sleep(0.002)
        time.sleep(0.05)  # anything served twice would show now
        heads += [completion.head for completion in self.driver.collect(0)]
        return heads

    def twin(self, machine: Machine) -> Disk:
        """The same driver (its rings are in guest RAM) driving the restored machine's disk."""
        driver = copy.copy(self.driver)
        driver.queues = copy.deepcopy(self.driver.queues)
        (driver.device,) = machine.virtio.devices
        driver.memory = machine.memory
        return Disk(machine, driver)


def disk_machine(socket_path) -> Machine:
    config = MachineConfig(
        boot_code=HALT,
        rng=False,
        host_profile="none",
        memory=64 << 20,
        vhost_user_disks=(VhostUserDiskConfig(str(socket_path)),),
    )
    return Machine(config)


def recording(monkeypatch) -> list[tuple]:
    """What every vhost-user frontend is asked to hand its backend, in order."""
    calls: list[tuple] = []
    for name in ("set_mem_table", "set_vring_base"):
        original = getattr(VhostUserFrontend, name)

        def record(self, *arguments, _name=name, _original=original):
            calls.append((_name, *arguments))
            return _original(self, *arguments)

        monkeypatch.setattr(VhostUserFrontend, name, record)
    return calls


def test_the_restored_daemon_gets_memfd_ram_and_the_ring_where_it_stopped(tmp_path, monkeypatch):
    image, socket_path, snapshot = tmp_path / "disk.img", tmp_path / "blk.sock", tmp_path / "snap"
    image.write_bytes(IMAGE)
    written = b"written before the snapshot".ljust(SECTOR, b".")
    with storage_daemon(image, socket_path):
        with disk_machine(socket_path) as machine:
            disk = Disk(machine)
            reads = [disk.post(VIRTIO_BLK_T_IN, sector, read=SECTOR) for sector in range(3)]
            write = disk.post(VIRTIO_BLK_T_OUT, 9, data=written)
            assert sorted(disk.kick_and_collect(4)) == sorted(r[0] for r in [*reads, write])
            for sector, (_, data, status) in enumerate(reads):
                assert machine.memory.read_u8(status) == VIRTIO_BLK_S_OK
                assert machine.memory.read(data, SECTOR) == IMAGE[sector * SECTOR :][:SECTOR]
            pending = disk.post(VIRTIO_BLK_T_IN, 9, read=SECTOR)  # available, never kicked
            result = machine.snapshot(str(snapshot), then="stop")
            saved_ram = machine.memory.read(0, 64 << 20)
        assert result.state == "stopped"
        calls = recording(monkeypatch)
        with Machine.restore(str(snapshot)) as restored:
            assert restored.memory.shareable, "RAM the daemon can map"
            assert not restored.ram_backings, "not the snapshot file mapped privately"
            assert restored.memory.read(0, 64 << 20) == saved_ram
            fds = [bank.fd for bank in restored.memory]
            (table,) = [call[1] for call in calls if call[0] == "set_mem_table"]
            assert [region.fd for region in table] == fds
            assert [region.user_address for region in table] == [
                bank.host_address() for bank in restored.memory
            ]
            assert ("set_vring_base", 0, 4) in calls, calls
            again = disk.twin(restored)
            assert again.kick_and_collect(1) == [pending[0]], "the pending one, nothing twice"
            assert restored.memory.read_u8(pending[2]) == VIRTIO_BLK_S_OK
            assert restored.memory.read(pending[1], SECTOR) == written
            after = b"written after the restore".ljust(SECTOR, b"!")
            requests = [again.post(VIRTIO_BLK_T_OUT, 10, data=after)]
            requests.append(again.post(VIRTIO_BLK_T_FLUSH, 0))
            assert sorted(again.kick_and_collect(2)) == sorted(r[0] for r in requests)
            assert all(restored.memory.read_u8(r[2]) == VIRTIO_BLK_S_OK for r in requests)
            assert restored.stats()["virtio"]["vhost-user-blk0"]["backend_error"] is None
    assert image.read_bytes()[9 * SECTOR : 11 * SECTOR] == written + after


def test_a_paused_machines_daemon_serves_nothing_until_the_snapshot_resumes_it(tmp_path):
    image, socket_path = tmp_path / "disk.img", tmp_path / "blk.sock"
    image.write_bytes(IMAGE)
    with storage_daemon(image, socket_path), disk_machine(socket_path) as machine:
        disk = Disk(machine)
        machine.pause()
        head, data, _ = disk.post(VIRTIO_BLK_T_IN, 5, read=SECTOR)
        os.eventfd_write(disk.device.kick_eventfd(0), 1)
        time.sleep(0.2)
        assert disk.driver.collect(0) == [], "served while the machine was paused"
        machine.snapshot(str(tmp_path / "snap"), then="resume")
        assert disk.kick_and_collect(1) == [head]
        assert machine.memory.read(data, SECTOR) == IMAGE[5 * SECTOR :][:SECTOR]


def test_a_restore_whose_daemon_is_gone_is_one_line(tmp_path):
    image, socket_path, snapshot = tmp_path / "disk.img", tmp_path / "blk.sock", tmp_path / "snap"
    image.write_bytes(IMAGE)
    with storage_daemon(image, socket_path), disk_machine(socket_path) as machine:
        Disk(machine)
        machine.snapshot(str(snapshot), then="stop")
    gone = r"cannot connect to the vhost-user backend at .*blk\.sock: connection refused"
    with pytest.raises(KvmletError, match=gone) as caught:
        Machine.restore(str(snapshot))
    assert "\n" not in str(caught.value)
