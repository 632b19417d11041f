"""A VhostDevice behind the virtio transports as they are: its kick eventfds are the doorbells
the bus reports (and moves with the BAR), and a relayed call is the queue's interrupt in every
interrupt mode (MSI-X vector, INTx with ISR, virtio-mmio's InterruptStatus)."""

from __future__ import annotations

import os
import socket
import time

import pytest

from kvmlet.bus import RecordingListener, mmio_space
from kvmlet.devices.irq import RecordingIrqLine
from kvmlet.memory import GuestMemory
from kvmlet.vhost.device import VhostDevice
from kvmlet.vhost.user import VhostUserFrontend
from kvmlet.virtio import pci_layout as layout
from kvmlet.virtio.mmio import INTERRUPT_STATUS, QUEUE_NOTIFY, VirtioMmio
from kvmlet.virtio.worker import QueueWorker
from tests.helpers.vhost_user_backend import PythonBackend
from tests.helpers.virtio_driver import GUEST_RAM_SIZE, MockDriver
from tests.unit.virtio.test_pci import BAR_ADDRESS, MSI_ADDRESS, LinuxLikeDriver


@pytest.fixture
def device():
    memory = GuestMemory.memfd([(0, GUEST_RAM_SIZE)])
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    backend = PythonBackend(theirs).start()
    frontend = VhostUserFrontend(ours, name="python-backend", timeout=3.0)
    vhost = VhostDevice(memory, frontend, name="vhost-test", device_id=2, queue_sizes=[16, 16])
    worker = QueueWorker("vhost-test")
    vhost.connect_worker(worker)
    worker.start()
    yield vhost
    worker.stop()
    vhost.close()
    backend.stop()
    memory.close()
    assert backend.error is None


def wait_until(condition, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.002)


def test_pci_doorbells_are_the_kick_eventfds_and_calls_fire_the_queue_vector(device):
    pci = LinuxLikeDriver(device, device.memory)
    for index in range(2):
        pci.pci.add_doorbell(index, device.kick_eventfd(index))
    pci.probe()
    notifiers = {(n.address, n.eventfd) for n in pci.listener.notifiers}
    notify = BAR_ADDRESS + layout.NOTIFY_OFFSET
    assert notifiers == {(notify, device.kick_eventfd(0)), (notify + 4, device.kick_eventfd(1))}
    pci.initialize()
    head, (answer,) = pci.rings.post_data(1, [b"through pci"], [11])
    os.eventfd_write(device.kick_eventfd(1), 1)  # KVM's ioeventfd on the guest's notify write
    wait_until(lambda: pci.msi.vectors[2].fired)
    assert pci.msi.vectors[2].fired == [(MSI_ADDRESS, 0x32)]
    assert [c.head for c in pci.rings.collect(1)] == [head]
    assert device.memory.read(answer, 11) == b"icp hguorht"
    assert pci.pci.stats()["notify_exits"] == 0
    assert pci.irq.history == []


def test_pci_without_msix_a_call_is_the_isr_and_intx(device):
    pci = LinuxLikeDriver(device, device.memory)
    pci.probe()
    pci.initialize(msix=False)
    pci.rings.post_data(0, [b"x"], [1])
    pci.kick(0)  # no ioeventfd here: the notify write reaches Python and is passed on
    wait_until(lambda: pci.irq.level)
    assert pci.isr() == layout.ISR_QUEUE
    assert not pci.irq.level, "reading ISR lowers INTx"


def test_mmio_doorbells_match_the_queue_index_and_calls_raise_the_line(device):
    irq = RecordingIrqLine()
    mmio = VirtioMmio(device, irq)
    space, listener = mmio_space(), RecordingListener()
    space.add_listener(listener)
    space.root.add_subregion(0xD000_0000, mmio.region)
    for index in range(2):
        mmio.add_doorbell(index, device.kick_eventfd(index))
    assert {(n.address, n.datamatch, n.eventfd) for n in listener.notifiers} == {
        (0xD000_0000 + QUEUE_NOTIFY, index, device.kick_eventfd(index)) for index in range(2)
    }
    driver = MockDriver(device, device.memory, 0x10000, 1 << 20, record_interrupts=False)
    driver.initialize()
    driver.post_data(0, [b"mmio"], [4])
    os.eventfd_write(device.kick_eventfd(0), 1)
    wait_until(lambda: irq.level)
    assert space.read(0xD000_0000 + INTERRUPT_STATUS, 4) == 1
