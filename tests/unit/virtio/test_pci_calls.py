"""virtio-pci binds a backend's call eventfds to the queues' MSI-X vectors while they can fire.

A VhostDevice with an idle backend (the test writes the call eventfds itself, as a backend
would) behind VirtioPci, driven like Linux through the bus. KVM's irqfds are played by
`IrqfdController`, the device's worker by `StepWorker`. Each write must reach the guest exactly
once, the way the MSI-X and INTx state at that moment says: the vector (directly or relayed),
its pending bit while masked, ISR with INTx while MSI-X is off, nothing for NO_VECTOR.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvmlet.bus.pci.msi import NO_VECTOR
from kvmlet.memory import GuestMemory
from kvmlet.vhost.device import VhostDevice
from kvmlet.virtio import pci_layout as layout
from tests.helpers.irqfd import IdleFrontend, IrqfdController, StepWorker
from tests.helpers.virtio_driver import GUEST_RAM_SIZE
from tests.unit.virtio.test_pci import MSI_ADDRESS, LinuxLikeDriver

QUEUES = 2
VECTORS = QUEUES + 1


class Rig:
    def __init__(self, initialize: bool = True):
        self.memory = GuestMemory.anonymous([(0, GUEST_RAM_SIZE)])
        self.device = VhostDevice(
            self.memory, IdleFrontend(), name="vhost-test", device_id=2, queue_sizes=[16] * QUEUES
        )
        self.kvm = IrqfdController()
        self.driver = LinuxLikeDriver(self.device, self.memory, self.kvm)
        self.worker = StepWorker()
        self.device.connect_worker(self.worker)
        if initialize:
            self.driver.probe()
            self.driver.initialize()
        self.calls = [self.device.call_eventfd(index) for index in range(QUEUES)]

    def write(self, queue):
        """The backend used buffers of `queue`."""
        self.kvm.backend_write(self.calls[queue].fd)

    def fired(self):
        return [len(self.kvm.vector(index).fired) for index in range(VECTORS)]

    def attached(self):
        return [self.kvm.vector(index).attached for index in range(VECTORS)]

    def set_vector(self, queue, vector):
        self.driver.write(layout.QUEUE_SELECT, queue, 2)
        self.driver.write(layout.QUEUE_MSIX_VECTOR, vector, 2)

    def msix_control(self, enable, function_mask):
        value = (0x8000 if enable else 0) | (0x4000 if function_mask else 0)
        self.driver.config_write(self.driver.caps[0x11] + 2, value, size=2)

    def close(self):
        self.device.close()
        self.memory.close()


@pytest.fixture
def rig():
    made = Rig()
    yield made
    made.close()


def test_each_queue_call_is_an_irqfd_on_its_vector(rig):
    assert rig.attached() == [set(), {rig.calls[0].fd}, {rig.calls[1].fd}]
    assert all(watch.wanted == (False, False) for watch in rig.worker.watches)
    rig.write(0)
    rig.write(1)
    rig.write(1)
    rig.worker.round()
    assert rig.fired() == [0, 1, 2] and [call.relayed for call in rig.calls] == [0, 0]


def test_a_restored_transport_binds_the_calls_to_its_restored_vectors(rig):
    rig.set_vector(0, 2)
    rig.device.pause_backend()
    state = rig.driver.pci.save_state()
    restored = Rig(initialize=False)
    try:
        assert restored.attached() == [set(), set(), set()]
        restored.driver.pci.load_state(state)
        assert restored.attached() == [set(), set(), {c.fd for c in restored.calls}]
        assert restored.fired() == [0, 0, QUEUES], "each restored ring's call, once"
        restored.write(0)
        assert restored.fired() == [0, 0, QUEUES + 1]
    finally:
        restored.close()


def test_a_new_vector_moves_the_irqfd(rig):
    rig.set_vector(0, 2)
    assert rig.attached() == [set(), set(), {rig.calls[0].fd, rig.calls[1].fd}]
    rig.write(0)
    assert rig.fired() == [0, 0, 1]


def test_no_vector_relays_and_drops_the_interrupt(rig):
    rig.set_vector(0, NO_VECTOR)
    assert not rig.calls[0].bound
    rig.write(0)
    rig.worker.round()
    assert rig.calls[0].relayed == 1
    assert rig.fired() == [0, 0, 0] and rig.driver.pending() == set()


def test_an_out_of_table_vector_is_no_vector(rig):
    rig.set_vector(1, VECTORS)
    assert rig.driver.read(layout.QUEUE_MSIX_VECTOR, 2) == NO_VECTOR
    assert rig.attached() == [set(), {rig.calls[0].fd}, set()]


def test_the_function_mask_relays_into_pending_bits_then_rebinds(rig):
    rig.msix_control(enable=True, function_mask=True)
    assert rig.attached() == [set(), set(), set()]
    rig.write(0)
    rig.write(0)
    rig.worker.round()
    assert rig.driver.pending() == {1} and rig.fired() == [0, 0, 0]
    rig.msix_control(enable=True, function_mask=False)
    assert rig.fired() == [0, 1, 0], "the pending bit fires once"
    assert rig.attached() == [set(), {rig.calls[0].fd}, {rig.calls[1].fd}]


def test_msix_off_relays_into_isr_and_intx(rig):
    rig.msix_control(enable=False, function_mask=False)
    assert rig.attached() == [set(), set(), set()]
    rig.write(1)
    rig.worker.round()
    assert rig.driver.irq.level and rig.driver.isr() == layout.ISR_QUEUE
    assert rig.fired() == [0, 0, 0]


def test_a_reset_unbinds_every_call(rig):
    rig.driver.write(layout.DEVICE_STATUS, 0, 1)
    assert rig.attached() == [set(), set(), set()]
    assert all(watch.wanted == (True, False) for watch in rig.worker.watches)
    rig.write(0)
    rig.worker.round()
    assert rig.fired() == [0, 0, 0], "a call after a reset is no interrupt"


def test_closing_the_device_detaches_its_calls(rig):
    rig.device.close()
    assert rig.attached() == [set(), set(), set()]
    rig.set_vector(0, 1)  # the guest keeps writing registers: nothing to bind any more


# Sequences of events against a model ------------------------------------------------------


class Model:
    """What the guest must see, from the MSI-X state and what the eventfds hold."""

    def __init__(self):
        self.enabled, self.function_masked = True, False
        self.entry_masked = [False] * VECTORS
        self.vectors = [1 + queue for queue in range(QUEUES)]
        self.pending = [False] * VECTORS
        self.fired = [0] * VECTORS
        self.isr = False
        self.waiting = [0] * QUEUES
        self.bound: list[int | None] = [1 + queue for queue in range(QUEUES)]

    def masked(self, vector):
        return not self.enabled or self.function_masked or self.entry_masked[vector]

    def target(self, queue):
        vector = self.vectors[queue]
        return None if vector == NO_VECTOR or self.masked(vector) else vector

    def write(self, queue):
        if self.bound[queue] is None:
            self.waiting[queue] += 1
        else:
            self.fired[self.bound[queue]] += 1

    def worker_round(self):
        for queue in range(QUEUES):
            if self.bound[queue] is None and self.waiting[queue]:
                self.waiting[queue] = 0
                self.relay(queue)

    def relay(self, queue):
        vector = self.vectors[queue]
        if not self.enabled:
            self.isr = True
        elif vector == NO_VECTOR:
            return
        elif self.masked(vector):
            self.pending[vector] = True
        else:
            self.fired[vector] += 1

    def settle(self):
        """After a guest write: pending bits of unmasked vectors fire, then calls move."""
        for vector in range(VECTORS):
            if self.pending[vector] and not self.masked(vector):
                self.pending[vector] = False
                self.fired[vector] += 1
        for queue in range(QUEUES):
            target = self.target(queue)
            if target == self.bound[queue]:
                continue
            self.bound[queue] = target
            if target is not None and self.waiting[queue]:
                self.fired[target] += 1  # KVM delivers the count it finds at attach
                self.waiting[queue] = 0


events = st.lists(
    st.one_of(
        st.tuples(st.just("write"), st.integers(0, QUEUES - 1)),
        st.tuples(st.just("worker")),
        st.tuples(st.just("read-isr")),
        st.tuples(
            st.just("vector"),
            st.integers(0, QUEUES - 1),
            st.sampled_from([0, 1, 2, VECTORS, NO_VECTOR]),
        ),
        st.tuples(st.just("mask"), st.integers(0, VECTORS - 1), st.booleans()),
        st.tuples(st.just("control"), st.booleans(), st.booleans()),
    ),
    max_size=40,
)


@given(events)
def test_every_write_reaches_the_guest_once_whatever_the_guest_does(sequence):
    rig, model = Rig(), Model()
    try:
        for event in sequence:
            kind, arguments = event[0], event[1:]
            if kind == "write":
                rig.write(*arguments)
                model.write(*arguments)
            elif kind == "worker":
                rig.worker.round()
                model.worker_round()
            elif kind == "read-isr":
                assert bool(rig.driver.isr() & layout.ISR_QUEUE) == model.isr
                model.isr = False
            elif kind == "vector":
                queue, vector = arguments
                rig.set_vector(queue, vector)
                model.vectors[queue] = vector if vector < VECTORS else NO_VECTOR
            elif kind == "mask":
                vector, masked = arguments
                rig.driver.mask_entry(vector, masked)
                model.entry_masked[vector] = masked
            else:
                rig.msix_control(*arguments)
                model.enabled, model.function_masked = arguments
            model.settle()
            check(rig, model)
    finally:
        rig.close()


def check(rig, model):
    assert rig.fired() == model.fired, "an interrupt lost or doubled"
    assert rig.driver.pending() == {v for v in range(VECTORS) if model.pending[v]}
    for queue, call in enumerate(rig.calls):
        bound = model.bound[queue]
        assert call.vector is (None if bound is None else rig.kvm.vector(bound))
        owners = [v for v in range(VECTORS) if call.fd in rig.kvm.vector(v).attached]
        assert owners == ([] if bound is None else [bound]), "attached where it may not fire"
        assert rig.worker.watches[queue].wanted == (bound is None, False), "watch and irqfd"
    for vector in rig.kvm.vectors.values():
        assert all(address == MSI_ADDRESS for address, _ in vector.fired)
