"""VhostDevice against a real vhost-user backend: qemu-storage-daemon's vhost-user-blk export.

No guest and no KVM: the mock driver posts virtio-blk requests in memfd guest RAM, QEMU's
daemon serves them from an image through its own mapping of that RAM, and the call eventfd
brings the completion back. Skips where qemu-storage-daemon is not installed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import struct
import time

import pytest

from kvmlet.memory import GuestMemory
from kvmlet.vhost.device import TRANSPORT_FEATURES, VhostDevice
from kvmlet.vhost.user import VhostUserFrontend
from kvmlet.virtio.device import DEVICE_NEEDS_RESET, InterruptKind
from kvmlet.virtio.worker import QueueWorker
from tests.helpers.storage_daemon import storage_daemon
from tests.helpers.virtio_driver import GUEST_RAM_SIZE, MockDriver

pytestmark = pytest.mark.skipif(
    shutil.which("qemu-storage-daemon") is None,
    reason="needs qemu-storage-daemon (apt-get install qemu-system-x86)",
)

SECTOR = 512
IMAGE_SIZE = 1 << 20
VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_FLUSH = 0, 1, 4
VIRTIO_BLK_F_FLUSH = 9
REQUEST_HEADER = struct.Struct("<IIQ")


def wait_until(condition, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.002)


class Disk:
    """qemu-storage-daemon exporting an image, and a VhostDevice on it with a mock driver."""

    def __init__(self, tmp_path):
        self.image = tmp_path / "disk.img"
        self.image.write_bytes(bytes(range(256)) * (IMAGE_SIZE // 256))
        socket_path = tmp_path / "blk.sock"
        self._daemon = contextlib.ExitStack()  # never leave a daemon behind, failed set-up or not
        self.daemon = self._daemon.enter_context(storage_daemon(self.image, socket_path))
        try:
            self._connect(socket_path)
        except BaseException:
            self._daemon.close()
            raise

    def _connect(self, socket_path):
        self.memory = GuestMemory.memfd([(0, GUEST_RAM_SIZE)])
        self.frontend = VhostUserFrontend.connect(str(socket_path), name="qsd", timeout=30.0)
        self.device = VhostDevice(
            self.memory,
            self.frontend,
            name="vhost-user-blk",
            device_id=2,
            queue_sizes=[128],
            features_mask=TRANSPORT_FEATURES | 1 << VIRTIO_BLK_F_FLUSH,
            config_size=60,
        )
        self.driver = MockDriver(self.device, self.memory, 0x10000, 2 << 20)
        self.worker = QueueWorker("vhost-user-blk")
        self.device.connect_worker(self.worker)
        self.worker.start()

    def request(
        self, kind: int, sector: int, data: bytes = b"", read: int = 0
    ) -> tuple[int, bytes]:
        """Post one request, kick as KVM would, wait for its completion and for an interrupt:
        (status, data read). The daemon also signals each call once when the ring is handed
        over, so a relayed interrupt alone does not say the request is done."""
        interrupts = len(self.driver.interrupts)
        readable = [REQUEST_HEADER.pack(kind, 0, sector), *([data] if data else [])]
        head, writable = self.driver.post_data(0, readable, [read, 1] if read else [1])
        os.eventfd_write(self.device.kick_eventfd(0), 1)
        completed = []
        wait_until(lambda: completed.extend(self.driver.collect(0)) or completed)
        assert [c.head for c in completed] == [head]
        wait_until(lambda: len(self.driver.interrupts) > interrupts)
        assert self.driver.interrupts[-1] == (InterruptKind.QUEUE, 0)
        status = self.memory.read_u8(writable[-1])
        return status, self.memory.read(writable[0], read) if read else b""

    def close(self):
        self.worker.stop()
        self.device.close()
        self._daemon.close()
        self.memory.close()


@pytest.fixture
def disk(tmp_path):
    made = Disk(tmp_path)
    yield made
    made.close()


def test_the_capacity_comes_from_the_daemon(disk):
    assert disk.frontend.protocol_features & 1 << 9, "CONFIG"
    assert disk.device.read_config(0, 8) == IMAGE_SIZE // SECTOR
    assert disk.device.device_features & 1 << VIRTIO_BLK_F_FLUSH


def test_reads_writes_and_flushes_are_served_by_the_daemon(disk):
    disk.driver.initialize()
    status, data = disk.request(VIRTIO_BLK_T_IN, 3, read=2 * SECTOR)
    assert status == 0
    assert data == disk.image.read_bytes()[3 * SECTOR : 5 * SECTOR]
    pattern = b"kvmlet via qemu-storage-daemon".ljust(SECTOR, b".")
    assert disk.request(VIRTIO_BLK_T_OUT, 7, data=pattern)[0] == 0
    assert disk.request(VIRTIO_BLK_T_FLUSH, 0)[0] == 0
    assert disk.image.read_bytes()[7 * SECTOR : 8 * SECTOR] == pattern
    assert disk.device.stats()["queues"][0]["requests"] == 0, "Python popped nothing"


def test_a_reset_takes_the_ring_back_and_the_disk_works_again(disk):
    disk.driver.initialize()
    for sector in range(3):
        assert disk.request(VIRTIO_BLK_T_IN, sector, read=SECTOR)[0] == 0
    disk.device.write_status(0)
    assert disk.device.status == 0
    assert disk.device.vring_bases == {0: 3}, "the daemon took three requests"
    disk.driver.initialize()
    status, data = disk.request(VIRTIO_BLK_T_IN, 9, read=SECTOR)
    assert status == 0 and data == disk.image.read_bytes()[9 * SECTOR : 10 * SECTOR]
    assert disk.device.backend_error is None


def test_a_killed_daemon_is_needs_reset_and_one_log_line(disk, caplog):
    caplog.set_level(logging.WARNING)
    disk.driver.initialize()
    disk.daemon.send_signal(signal.SIGKILL)
    disk.daemon.wait()
    disk.device.check_backend()
    assert disk.device.status & DEVICE_NEEDS_RESET
    assert disk.driver.interrupts[-1] == (InterruptKind.CONFIG, None)
    disk.device.write_status(0)
    disk.driver.initialize()
    assert disk.device.status & DEVICE_NEEDS_RESET
    warnings = [r for r in caplog.records if r.name == "kvmlet.vhost.device"]
    assert len(warnings) == 1
    assert "qsd: the backend closed the connection" in warnings[0].getMessage()
