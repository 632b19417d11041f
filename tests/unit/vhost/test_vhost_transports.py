"""A VhostDevice behind the virtio transports as they are: its kick eventfds are the doorbells
the bus reports (and moves with the BAR); a call eventfd is an irqfd on the queue's MSI-X vector
while that vector can fire (KVM's part played by tests/helpers/irqfd.py), and otherwise a relayed
call is the queue's interrupt in every mode (a masked vector's pending bit, INTx with ISR,
virtio-mmio's InterruptStatus)."""

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
from tests.helpers.irqfd import IrqfdController, readable
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


def test_pci_doorbells_are_the_kick_eventfds_and_calls_are_bound_to_the_queue_vector(device):
    pci = LinuxLikeDriver(device, device.memory, IrqfdController())
    for index in range(2):
        pci.pci.add_doorbell(index, device.kick_eventfd(index))
    pci.probe()
    notifiers = {(n.address, n.eventfd) for n in pci.listener.notifiers}
    notify = BAR_ADDRESS + layout.NOTIFY_OFFSET
    assert notifiers == {(notify, device.kick_eventfd(0)), (notify + 4, device.kick_eventfd(1))}
    pci.initialize()
    call = device.call_eventfd(1)
    assert pci.msi.vectors[2].attached == {call.fd}, "queue 1's call is an irqfd on vector 2"
    head, (answer,) = pci.rings.post_data(1, [b"through pci"], [11])
    os.eventfd_write(device.kick_eventfd(1), 1)  # KVM's ioeventfd on the guest's notify write
    wait_until(lambda: readable(call.fd))  # the backend's write, which KVM takes
    assert [c.head for c in pci.rings.collect(1)] == [head]
    assert device.memory.read(answer, 11) == b"icp hguorht"
    assert pci.pci.stats()["notify_exits"] == 0
    assert pci.msi.vectors[2].fired == [] and call.relayed == 0, "no Python step"
    assert device.stats()["calls"][1] == {"path": "irqfd", "relayed": 0, "binds": 1}
    assert pci.irq.history == []


def test_pci_queues_sharing_one_vector_have_their_calls_bound_to_it(device):
    device.msix_vectors = 2  # fewer than the queues need: the driver shares vector 1
    pci = LinuxLikeDriver(device, device.memory, IrqfdController())
    pci.probe()
    pci.initialize()
    assert pci.pci.msix.vector_count == 2
    calls = [device.call_eventfd(index) for index in range(2)]
    assert pci.msi.vectors[1].attached == {call.fd for call in calls}
    for index, call in enumerate(calls):
        head, _ = pci.rings.post_data(index, [b"shared"], [6])
        os.eventfd_write(device.kick_eventfd(index), 1)
        wait_until(lambda call=call: readable(call.fd))  # the backend's write, KVM's to take
        assert [c.head for c in pci.rings.collect(index)] == [head]
    assert pci.msi.vectors[1].fired == [] and all(call.relayed == 0 for call in calls)


def test_pci_a_masked_vector_gets_its_calls_relayed_into_the_pending_bit(device):
    pci = LinuxLikeDriver(device, device.memory, IrqfdController())
    pci.probe()
    pci.initialize()
    call, vector = device.call_eventfd(0), pci.msi.vectors[1]
    pci.mask_entry(1)
    assert vector.attached == set() and not call.bound
    pci.rings.post_data(0, [b"masked"], [6])
    os.eventfd_write(device.kick_eventfd(0), 1)
    wait_until(lambda: pci.pending() == {1})  # relayed by the device's worker
    assert vector.fired == [] and call.relayed == 1
    pci.mask_entry(1, masked=False)
    assert vector.fired == [(MSI_ADDRESS, 0x31)], "the pending interrupt, once, at unmask"
    assert pci.pending() == set() and vector.attached == {call.fd}
    assert device.stats()["calls"][0] == {"path": "irqfd", "relayed": 1, "binds": 2}


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
