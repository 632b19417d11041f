"""A vhost backend's call eventfd on real KVM: the write is the guest's MSI, with no Python step.

A VhostDevice (an idle backend: the test writes the call eventfds, as a backend would) behind
VirtioPci, with the machine's `KvmInterruptRouter` for its MSI-X vectors and a running worker
for the relay. The test drives the transport through the bus as Linux's driver does; a
real-mode vCPU with its local APIC enabled takes the vectors, each handler reporting its vector
with an `out 0x10` exit. A write to a bound call eventfd must reach the handler while the
worker sleeps (its wake-ups, the relay's and the vector's Python fires all stay 0), and the
binding must follow the guest: a masked entry holds the call in its pending bit until the
unmask, a new queue vector and a reprogrammed message are what the next call raises, and the
function mask defers calls as the entry mask does.
"""

from __future__ import annotations

import os
import threading
import time

import pytest

from kvmlet.kvm import InterruptedExit, IoExit, Kvm
from kvmlet.memory import GuestMemory
from kvmlet.vhost.device import VhostDevice
from kvmlet.virtio import pci_layout as layout
from kvmlet.virtio.worker import QueueWorker
from kvmlet.vstate.interrupts import KvmInterruptRouter
from tests.helpers.irqfd import IdleFrontend
from tests.helpers.virtio_driver import GUEST_RAM_SIZE
from tests.kvm.test_interrupts import LAPIC_PROGRAM, MSI_ADDRESS, RAM_SIZE, real_mode_guest, run_for
from tests.unit.virtio.test_pci import LinuxLikeDriver

pytestmark = pytest.mark.kvm

GUEST_VECTORS = (0x31, 0x32, 0x33)
"""The interrupt vectors the guest handles: LinuxLikeDriver programs entry i with 0x30 + i."""
HANDLERS = 0x1200
HANDLER_SIZE = 0x20


def handler(vector: int) -> bytes:
    """EOI to the local APIC (ES is based at it), `out 0x10, vector`, iret."""
    return bytes.fromhex("2666c706b00000000000b0") + bytes([vector]) + bytes.fromhex("e610cf")


class Rig:
    def __init__(self, vm):
        self.guest_memory = GuestMemory.anonymous([(0, RAM_SIZE)])
        self.vcpu = real_mode_guest(vm, self.guest_memory, LAPIC_PROGRAM)
        for index, vector in enumerate(GUEST_VECTORS):
            address = HANDLERS + HANDLER_SIZE * index
            self.guest_memory.write(address, handler(vector))
            self.guest_memory.write_u16(4 * vector, address)
            self.guest_memory.write_u16(4 * vector + 2, 0)
        sregs = self.vcpu.get_sregs()
        sregs.es.base = MSI_ADDRESS
        self.vcpu.set_sregs(sregs)
        self.router = KvmInterruptRouter(vm)
        self.msi = self.router.controller()
        # The device's rings live in memory of their own: the idle backend never reads them.
        self.device_memory = GuestMemory.anonymous([(0, GUEST_RAM_SIZE)])
        self.device = VhostDevice(
            self.device_memory, IdleFrontend(), name="vhost-kvm", device_id=2, queue_sizes=[16, 16]
        )
        self.worker = QueueWorker("vhost-kvm")
        self.device.connect_worker(self.worker)
        self.worker.start()
        self.driver = LinuxLikeDriver(self.device, self.device_memory, self.msi)
        self.driver.probe()
        self.driver.initialize()
        self.calls = [self.device.call_eventfd(index) for index in range(2)]
        # A software-disabled local APIC drops fixed interrupts: let the guest enable its own
        # and halt before any call is written.
        assert isinstance(run_for(self.vcpu, 0.1), InterruptedExit)

    def backend_write_while_halted(self, queue: int):
        """The backend signals `queue`'s call while the vCPU sits in KVM_RUN, halted; the
        guest's next exit."""
        writer = threading.Timer(0.05, os.eventfd_write, (self.calls[queue].fd, 1))
        writer.start()
        try:
            return run_for(self.vcpu, 2.0)
        finally:
            writer.join()

    def expect_interrupt(self, exit, vector: int) -> None:
        assert isinstance(exit, IoExit) and exit.port == 0x10, exit
        assert exit.data[0] == vector, f"vector {exit.data[0]:#x}, expected {vector:#x}"

    def expect_quiet(self) -> None:
        assert isinstance(run_for(self.vcpu, 0.2), InterruptedExit), "an interrupt came"

    def python_steps(self) -> tuple[int, int, int]:
        """(worker wake-ups, relayed calls, vector fires from Python)."""
        fires = sum(vector.fired for vector in self.msi.vectors.values())
        return self.worker.wakeups, sum(call.relayed for call in self.calls), fires

    def wait_pending(self, expected: set[int]) -> None:
        deadline = time.monotonic() + 5.0
        while self.driver.pending() != expected:
            assert time.monotonic() < deadline, f"pending {self.driver.pending()}"
            time.sleep(0.002)

    def close(self):
        self.worker.stop()
        self.device.close()
        self.router.close()
        self.vcpu.close()
        self.device_memory.close()
        self.guest_memory.close()


@pytest.fixture
def rig():
    with Kvm() as kvm:
        vm = kvm.create_vm()
        vm.setup_x86_platform()
        made = Rig(vm)
        try:
            yield made
        finally:
            made.close()
            vm.close()


def test_a_bound_call_is_the_guest_interrupt_with_no_python_step(rig):
    assert [call.bound for call in rig.calls] == [True, True]
    before = rig.python_steps()
    rig.expect_interrupt(rig.backend_write_while_halted(0), 0x31)
    rig.expect_interrupt(rig.backend_write_while_halted(1), 0x32)
    rig.expect_quiet()
    assert rig.python_steps() == before == (0, 0, 0), "the worker never woke"


def test_a_masked_vector_holds_the_call_in_its_pending_bit_until_unmasked(rig):
    rig.driver.mask_entry(1)
    assert not rig.calls[0].bound
    os.eventfd_write(rig.calls[0].fd, 1)
    rig.wait_pending({1})  # relayed by the worker into the pending bit
    rig.expect_quiet()
    assert rig.calls[0].relayed == 1
    rig.driver.mask_entry(1, masked=False)
    assert rig.calls[0].bound and rig.driver.pending() == set()
    rig.expect_interrupt(run_for(rig.vcpu, 2.0), 0x31)
    rig.expect_quiet()
    wakeups = rig.worker.wakeups
    rig.expect_interrupt(rig.backend_write_while_halted(0), 0x31)
    assert (rig.worker.wakeups, rig.calls[0].relayed) == (wakeups, 1), "bound again"


def test_a_new_queue_vector_and_a_reprogrammed_message_are_followed(rig):
    rig.driver.write(layout.QUEUE_SELECT, 0, 2)
    rig.driver.write(layout.QUEUE_MSIX_VECTOR, 2, 2)
    rig.expect_interrupt(rig.backend_write_while_halted(0), 0x32)
    # Linux's __pci_write_msi_msg: mask the entry, write the message, unmask.
    table = rig.driver.bar + (rig.driver.config_read(rig.driver.caps[0x11] + 4) & ~7)
    rig.driver.mask_entry(2)
    rig.driver.mmio.write(table + 16 * 2 + 8, 4, 0x33)
    rig.driver.mask_entry(2, masked=False)
    rig.expect_interrupt(rig.backend_write_while_halted(0), 0x33)
    rig.expect_interrupt(rig.backend_write_while_halted(1), 0x33)
    rig.expect_quiet()
    assert rig.python_steps() == (0, 0, 0)


def test_the_function_mask_defers_calls_to_the_unmask(rig):
    control = rig.driver.caps[0x11] + 2
    rig.driver.config_write(control, 0xC000, size=2)  # MSI-X enabled, function masked
    assert not any(call.bound for call in rig.calls)
    os.eventfd_write(rig.calls[1].fd, 1)
    rig.wait_pending({2})
    rig.expect_quiet()
    rig.driver.config_write(control, 0x8000, size=2)
    rig.expect_interrupt(run_for(rig.vcpu, 2.0), 0x32)
    rig.expect_quiet()
    assert all(call.bound for call in rig.calls)
    rig.expect_interrupt(rig.backend_write_while_halted(1), 0x32)
    assert rig.calls[1].relayed == 1
