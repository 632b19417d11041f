"""The machine's wiring of vhost devices (machine/vhost_devices.py), without KVM: a vhost-user
disk on a Python backend behind virtio-pci, its kicks and calls never on a Python doorbell,
the backend watch that notices a hang-up (and only a hang-up), and the failures at start."""

from __future__ import annotations

import logging
import os
import socket
import stat
import threading
import time
from types import SimpleNamespace

import pytest

from kvmlet.errors import KvmletError
from kvmlet.machine.config import MachineConfig
from kvmlet.machine.vhost_config import FilesystemConfig, VhostUserDiskConfig
from kvmlet.machine.vhost_devices import VhostDevices
from kvmlet.memory import GuestMemory
from kvmlet.virtio import pci_layout as layout
from kvmlet.virtio.device import DEVICE_NEEDS_RESET
from kvmlet.virtio.rng import VirtioRng
from kvmlet.virtio.worker import QueueWorker
from tests.helpers.vhost_user_backend import SILENCE, PythonBackend
from tests.helpers.virtio_driver import GUEST_RAM_SIZE
from tests.unit.virtio.test_pci import BAR_ADDRESS, LinuxLikeDriver

CONFIG_VECTOR = 0  # LinuxLikeDriver's: configuration changes on vector 0, queue i on i + 1


def wait_until(condition, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.002)


def signalled(fd: int) -> bool:
    try:
        return os.eventfd_read(fd) > 0
    except BlockingIOError:
        return False


class ListeningBackend:
    """A Python vhost-user backend accepting one connection at `path`, like a daemon."""

    def __init__(self, path):
        self.listener = socket.socket(socket.AF_UNIX)
        self.listener.bind(str(path))
        self.listener.listen(1)
        self.backend: PythonBackend | None = None
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self):
        connection, _ = self.listener.accept()
        self.backend = PythonBackend(connection).start()

    def stop(self):
        self.listener.close()
        self._thread.join(5)
        if self.backend is not None:
            self.backend.stop()


@pytest.fixture
def memory():
    ram = GuestMemory.memfd([(0, GUEST_RAM_SIZE)])
    yield ram
    ram.close()


def machine_with(memory, **fields):
    return SimpleNamespace(config=MachineConfig(boot_code=b"\xf4", **fields), memory=memory)


@pytest.fixture
def wired(tmp_path, memory):
    """A vhost-user disk on a Python backend, wired to virtio-pci and a started worker."""
    served = ListeningBackend(tmp_path / "blk.sock")
    vhost = VhostDevices(
        machine_with(memory, vhost_user_disks=(VhostUserDiskConfig(tmp_path / "blk.sock"),))
    )
    device = vhost.devices[0]
    pci = LinuxLikeDriver(device, memory)
    worker = QueueWorker("vhost-user-blk0")
    served_queues = vhost.wire(device, pci.pci, worker)
    worker.start()
    yield SimpleNamespace(
        vhost=vhost, device=device, pci=pci, worker=worker, served=served, queues=served_queues
    )
    worker.stop()
    device.close()
    vhost.close()
    served.stop()
    assert served.backend.error is None


def test_the_backend_serves_the_queue_through_the_doorbell_and_the_call(wired):
    assert wired.queues == 1, "the backend's queue: no Python doorbell for it"
    assert wired.worker.doorbells == []
    assert wired.device.read_config(0, 8) == int.from_bytes(bytes(range(8)), "little")
    wired.pci.probe()
    notify = BAR_ADDRESS + layout.NOTIFY_OFFSET
    assert {(n.address, n.eventfd) for n in wired.pci.listener.notifiers} == {
        (notify, wired.device.kick_eventfd(0))
    }
    wired.pci.initialize()
    call = wired.device.call_eventfd(0)
    assert call.fd in wired.pci.msi.vectors[1].attached, "KVM delivers the backend's call"
    head, (answer,) = wired.pci.rings.post_data(0, [b"wired"], [5])
    os.eventfd_write(wired.device.kick_eventfd(0), 1)  # KVM's ioeventfd on the notify write
    wait_until(lambda: signalled(call.fd))  # what KVM would turn into the vector's message
    assert [c.head for c in wired.pci.rings.collect(0)] == [head]
    assert wired.device.memory.read(answer, 5) == b"deriw"
    stats = wired.pci.pci.stats()
    assert stats["queues"][0]["requests"] == 0 and stats["notify_exits"] == 0
    assert stats["calls"] == [{"path": "irqfd", "relayed": 0, "binds": 1}]
    assert not wired.pci.msi.vectors[1].fired, "no Python step"


def test_resets_and_renegotiation_are_not_taken_for_a_hang_up(wired):
    wired.pci.probe()
    for _ in range(5):  # each exchange's reply makes the watched socket readable for a moment
        wired.pci.initialize()
        wired.pci.write(layout.DEVICE_STATUS, 0, 1)
        assert wired.pci.read(layout.DEVICE_STATUS, 1) == 0
    time.sleep(0.1)
    assert wired.device.backend_error is None
    assert len(wired.vhost._backend_watches) == 1


def test_a_backend_that_hangs_up_is_needs_reset_once_and_the_watch_ends(wired, caplog):
    caplog.set_level(logging.WARNING)
    wired.pci.probe()
    wired.pci.initialize()
    wired.served.backend.hang_up()
    wait_until(lambda: not wired.vhost._backend_watches)
    assert wired.device.status & DEVICE_NEEDS_RESET
    assert wired.pci.msi.vectors[CONFIG_VECTOR].fired, "the driver is told"
    wired.pci.write(layout.DEVICE_STATUS, 0, 1)  # the guest's driver resets: that completes
    assert wired.pci.read(layout.DEVICE_STATUS, 1) == 0
    time.sleep(0.05)
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(lines) == 1, lines
    assert "the backend closed the connection" in lines[0]
    assert "the guest keeps running" in lines[0]
    assert wired.worker.stats()["device_errors"] == 0


def test_a_device_that_is_not_vhost_is_left_to_the_caller(wired, memory):
    rng = VirtioRng(memory)
    assert wired.vhost.wire(rng, LinuxLikeDriver(rng, memory).pci, QueueWorker("rng")) == 0


def test_a_virtiofsd_that_dies_at_start_is_its_status_and_last_words(tmp_path, memory):
    script = tmp_path / "failing-virtiofsd"
    script.write_text("#!/bin/sh\necho 'fuse: unknown option'\nexit 3\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    share = FilesystemConfig("data", str(tmp_path))
    machine = machine_with(memory, filesystems=(share,), virtiofsd=str(script))
    before = set(os.listdir(os.environ.get("XDG_RUNTIME_DIR") or "/tmp"))
    with pytest.raises(
        KvmletError,
        match=r"virtiofsd for 'data' \(pid \d+\) exited with status 3: fuse: unknown option",
    ):
        VhostDevices(machine)
    after = set(os.listdir(os.environ.get("XDG_RUNTIME_DIR") or "/tmp"))
    assert not {name for name in after - before if name.startswith("kvmlet-virtiofsd")}


@pytest.mark.skipif(os.path.exists("/dev/vhost-vsock"), reason="this host has vhost-vsock")
def test_a_host_without_vhost_vsock_is_one_line(memory):
    with pytest.raises(KvmletError, match="--vsock 3: cannot open /dev/vhost-vsock: no such file"):
        VhostDevices(machine_with(memory, vsock_cid=3))


def test_a_backend_that_is_not_there_is_one_line(tmp_path, memory):
    machine = machine_with(memory, vhost_user_disks=(VhostUserDiskConfig(tmp_path / "none"),))
    with pytest.raises(KvmletError, match="cannot connect to the vhost-user backend at"):
        VhostDevices(machine)


def test_a_silent_backend_is_hung_up_on_though_the_watch_holds_the_socket(wired):
    wired.pci.probe()
    wired.device.frontend.timeout = 0.2
    wired.served.backend.misbehave = lambda request: SILENCE
    wired.pci.initialize()  # DRIVER_OK: the backend never acknowledges
    assert wired.device.status & DEVICE_NEEDS_RESET
    backend_thread = wired.served.backend._thread
    backend_thread.join(5)
    assert not backend_thread.is_alive(), "the backend saw the connection end"
    wait_until(lambda: not wired.vhost._backend_watches)
