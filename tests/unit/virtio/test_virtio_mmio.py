"""virtio-mmio v2 through the bus: a driver programs the registers the way Linux does."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmlet.bus import RecordingListener, mmio_space
from kvmlet.devices.irq import RecordingIrqLine
from kvmlet.memory import GuestMemory
from kvmlet.virtio import mmio
from kvmlet.virtio.console import TRANSMIT_QUEUE, VirtioConsole
from kvmlet.virtio.device import (
    ACKNOWLEDGE,
    COMMON_FEATURES,
    DEVICE_NEEDS_RESET,
    DRIVER,
    DRIVER_OK,
    FEATURES_OK,
)
from kvmlet.virtio.rng import VirtioRng
from tests.helpers.virtio_driver import MockDriver

BASE = 0xD000_0000


class MmioHarness:
    """A device behind VirtioMmio on an MMIO bus, plus a mock driver for the rings."""

    def __init__(self, device, memory):
        self.device = device
        self.irq = RecordingIrqLine()
        self.transport = mmio.VirtioMmio(device, self.irq)
        self.space = mmio_space()
        self.space.root.add_subregion(BASE, self.transport.region)
        self.driver = MockDriver(device, memory, 0x1000, 1 << 20, record_interrupts=False)

    def read(self, register, size=4):
        return self.space.read(BASE + register, size)

    def write(self, register, value, size=4):
        self.space.write(BASE + register, size, value)

    def initialize(self, queue_size=16):
        """The driver initialisation sequence (§3.1.1, §4.2.3.1) over the registers."""
        assert self.read(mmio.MAGIC_VALUE) == mmio.MAGIC
        assert self.read(mmio.VERSION) == 2
        self.write(mmio.STATUS, 0)
        self.write(mmio.STATUS, ACKNOWLEDGE)
        self.write(mmio.STATUS, ACKNOWLEDGE | DRIVER)
        features = 0
        for select in (0, 1):
            self.write(mmio.DEVICE_FEATURES_SEL, select)
            features |= self.read(mmio.DEVICE_FEATURES) << (32 * select)
        for select in (0, 1):
            self.write(mmio.DRIVER_FEATURES_SEL, select)
            self.write(mmio.DRIVER_FEATURES, features >> (32 * select) & 0xFFFF_FFFF)
        self.write(mmio.STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK)
        assert self.read(mmio.STATUS) & FEATURES_OK
        for index in range(self.device.queue_count):
            self.write(mmio.QUEUE_SEL, index)
            assert self.read(mmio.QUEUE_READY) == 0
            assert self.read(mmio.QUEUE_NUM_MAX) >= queue_size
            queue = self.driver.layout_queue(index, queue_size)
            self.write(mmio.QUEUE_NUM, queue_size)
            for low, address in (
                (mmio.QUEUE_DESC_LOW, queue.descriptor_table),
                (mmio.QUEUE_DRIVER_LOW, queue.available_ring),
                (mmio.QUEUE_DEVICE_LOW, queue.used_ring),
            ):
                self.write(low, address & 0xFFFF_FFFF)
                self.write(low + 4, address >> 32)
            self.write(mmio.QUEUE_READY, 1)
        self.write(mmio.STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK)
        return features


@pytest.fixture
def rng(memory):
    return MmioHarness(VirtioRng(memory), memory)


def test_identification_registers(rng):
    assert rng.read(mmio.DEVICE_ID) == 4
    assert rng.read(mmio.VENDOR_ID) == mmio.KVMLET_VENDOR_ID
    assert rng.read(mmio.SHM_LEN_LOW) == 0xFFFF_FFFF, "no shared memory regions"
    assert rng.read(mmio.MAGIC_VALUE, size=2) == 0, "control registers are 32-bit only"


def test_initialisation_negotiates_and_programs_queues(rng):
    features = rng.initialize()
    assert features == COMMON_FEATURES
    assert rng.device.driver_features == COMMON_FEATURES
    assert rng.device.running and rng.device.queues[0].active
    queue = rng.driver.queues[0]
    assert rng.device.queues[0].used_ring == queue.used_ring
    rng.write(mmio.QUEUE_SEL, 0)
    assert rng.read(mmio.QUEUE_READY) == 1
    assert rng.read(mmio.QUEUE_DEVICE_LOW) == queue.used_ring


def test_queue_notify_runs_the_device_and_raises_a_level_interrupt(rng):
    rng.initialize()
    head, _ = rng.driver.post_data(0, [], [32])
    rng.write(mmio.QUEUE_NOTIFY, 0)
    assert [c.head for c in rng.driver.collect(0)] == [head]
    assert rng.irq.level is True
    assert rng.read(mmio.INTERRUPT_STATUS) == mmio.INTERRUPT_USED_BUFFER
    rng.write(mmio.INTERRUPT_ACK, mmio.INTERRUPT_USED_BUFFER)
    assert rng.irq.level is False and rng.read(mmio.INTERRUPT_STATUS) == 0


def test_config_space_and_config_change_interrupt(memory):
    console = MmioHarness(VirtioConsole(memory, lambda data: None), memory)
    console.initialize()
    assert console.read(mmio.CONFIG, 2) == 80
    assert console.read(mmio.CONFIG + 2, 1) == 25
    generation = console.read(mmio.CONFIG_GENERATION)
    console.device.resize(100, 40)
    assert console.read(mmio.CONFIG_GENERATION) == generation + 1
    assert console.read(mmio.CONFIG, 4) == 100 | 40 << 16
    assert console.read(mmio.INTERRUPT_STATUS) == mmio.INTERRUPT_CONFIG_CHANGE
    console.write(mmio.INTERRUPT_ACK, mmio.INTERRUPT_USED_BUFFER)
    assert console.irq.level is True, "the config bit is still pending"
    console.write(mmio.INTERRUPT_ACK, mmio.INTERRUPT_CONFIG_CHANGE)
    assert console.irq.level is False


def test_guest_output_through_the_transmit_queue(memory):
    output = []
    console = MmioHarness(VirtioConsole(memory, output.append), memory)
    console.initialize()
    console.driver.post_data(TRANSMIT_QUEUE, [b"hvc0 says hi"], [])
    console.write(mmio.QUEUE_NOTIFY, TRANSMIT_QUEUE)
    assert output == [b"hvc0 says hi"]


def test_bad_rings_need_reset_and_status_zero_resets_everything(rng):
    rng.write(mmio.STATUS, ACKNOWLEDGE | DRIVER)
    rng.write(mmio.DRIVER_FEATURES_SEL, 1)
    rng.write(mmio.DRIVER_FEATURES, 1)
    rng.write(mmio.STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK)
    rng.write(mmio.QUEUE_SEL, 0)
    rng.write(mmio.QUEUE_NUM, 16)
    rng.write(mmio.QUEUE_DESC_HIGH, 0x10)
    rng.write(mmio.QUEUE_READY, 1)
    rng.write(mmio.STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK)
    assert rng.read(mmio.STATUS) & DEVICE_NEEDS_RESET
    assert rng.read(mmio.INTERRUPT_STATUS) == mmio.INTERRUPT_CONFIG_CHANGE
    rng.write(mmio.STATUS, 0)
    assert rng.read(mmio.STATUS) == 0 and rng.read(mmio.INTERRUPT_STATUS) == 0
    assert rng.irq.level is False
    assert rng.read(mmio.QUEUE_READY) == 0 and rng.read(mmio.QUEUE_DESC_HIGH) == 0


def test_unknown_queue_and_register_accesses_are_harmless(rng):
    rng.initialize()
    rng.write(mmio.QUEUE_SEL, 9)
    assert rng.read(mmio.QUEUE_NUM_MAX) == 0
    rng.write(mmio.QUEUE_NUM, 8)
    rng.write(mmio.QUEUE_NOTIFY, 9)
    rng.write(0x0E0, 0xDEAD)
    rng.write(mmio.STATUS, 0xFF, size=1)
    assert rng.device.running
    assert rng.space.handler_errors == 0


def test_kernel_parameter(rng):
    assert rng.transport.kernel_parameter(BASE, 5) == "virtio_mmio.device=0x200@0xd0000000:5"


REGISTER_OFFSETS = st.one_of(
    st.sampled_from(
        [
            mmio.DEVICE_FEATURES_SEL,
            mmio.DRIVER_FEATURES,
            mmio.DRIVER_FEATURES_SEL,
            mmio.QUEUE_SEL,
            mmio.QUEUE_NUM,
            mmio.QUEUE_READY,
            mmio.QUEUE_NOTIFY,
            mmio.INTERRUPT_ACK,
            mmio.STATUS,
            mmio.QUEUE_DESC_LOW,
            mmio.QUEUE_DESC_HIGH,
            mmio.QUEUE_DRIVER_LOW,
            mmio.QUEUE_DEVICE_LOW,
        ]
    ),
    st.integers(0, mmio.REGION_SIZE - 1),
)
ACCESSES = st.lists(
    st.tuples(
        st.booleans(),
        REGISTER_OFFSETS,
        st.sampled_from([1, 2, 4]),
        st.one_of(st.integers(0, 0xFFFF_FFFF), st.sampled_from([0, 1, 0xF, 16, 0x1000])),
    ),
    max_size=60,
)


@settings(max_examples=200, deadline=None)
@given(accesses=ACCESSES)
def test_random_register_traffic_never_breaks_the_handler(accesses):
    memory = GuestMemory.anonymous([(0, 1 << 20)])
    harness = MmioHarness(VirtioConsole(memory, lambda data: None), memory)
    try:
        for is_write, offset, size, value in accesses:
            offset -= offset % size
            if is_write:
                harness.write(offset, value & ((1 << (8 * size)) - 1), size)
            else:
                harness.read(offset, size)
        harness.device.receive(b"x")
        assert harness.space.handler_errors == 0
        assert harness.irq.level == bool(harness.transport.interrupt_status)
    finally:
        harness.device.close()
        memory.close()


def test_doorbells_are_notify_register_eventfds_matching_the_queue_index(memory):
    console = MmioHarness(VirtioConsole(memory, lambda data: None), memory)
    listener = RecordingListener()
    console.space.add_listener(listener)
    console.transport.add_doorbell(TRANSMIT_QUEUE, 42)
    (notifier,) = listener.notifiers
    address = BASE + mmio.QUEUE_NOTIFY
    assert (notifier.address, notifier.size, notifier.datamatch) == (address, 4, TRANSMIT_QUEUE)
    assert notifier.eventfd == 42
