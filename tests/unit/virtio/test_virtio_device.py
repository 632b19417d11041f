"""VirtioDevice core: negotiation, status, configuration space, queue setup, NEEDS_RESET."""

from __future__ import annotations

from kvmlet.virtio.device import (
    ACKNOWLEDGE,
    COMMON_FEATURES,
    DEVICE_NEEDS_RESET,
    DRIVER,
    DRIVER_OK,
    FEATURES_OK,
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_VERSION_1,
    InterruptKind,
    RingPart,
    VirtioDevice,
)
from kvmlet.virtio.rng import VirtioRng
from tests.helpers.virtio_driver import MockDriver


class EchoDevice(VirtioDevice):
    """A device with a writable-config-free config space, completing chains as empty."""

    name = "echo"

    def __init__(self, memory):
        super().__init__(memory, [16, 16], 1 << 3, bytes(range(1, 11)))

    def handle_request(self, request):
        return 0


def test_features_are_offered_through_32_bit_windows(memory):
    device = EchoDevice(memory)
    assert device.device_features == COMMON_FEATURES | 1 << 3
    assert device.device_features_word(0) == (1 << 3) | (COMMON_FEATURES & 0xFFFF_FFFF)
    assert device.device_features_word(1) == 1
    assert device.device_features_word(2) == 0


def test_features_ok_only_for_a_subset_including_version_1(memory):
    device = EchoDevice(memory)
    driver = MockDriver(device, memory, 0x1000, 0x10000)
    driver.negotiate(wanted=1 << 5 | 1 << VIRTIO_F_VERSION_1)
    assert not device.status & FEATURES_OK
    driver.negotiate(wanted=1 << 3)
    assert not device.status & FEATURES_OK
    driver.negotiate(wanted=1 << 3 | 1 << VIRTIO_F_VERSION_1)
    assert device.status == ACKNOWLEDGE | DRIVER | FEATURES_OK
    device.write_driver_features_word(0, 0)
    assert device.negotiated(3), "features are frozen after FEATURES_OK"


def test_reset_clears_status_features_and_queues(memory):
    device = EchoDevice(memory)
    driver = MockDriver(device, memory, 0x1000, 0x10000)
    driver.initialize()
    assert device.running and device.queue_ready(0)
    device.write_status(0)
    assert device.status == 0 and device.driver_features == 0
    assert not device.queue_ready(0)
    assert device.queue_address(0, RingPart.DESCRIPTOR) == 0
    assert device.queue_size(1) == 16


def test_config_reads_are_little_endian_and_bounded(memory):
    device = EchoDevice(memory)
    assert device.read_config(0, 4) == 0x04030201
    assert device.read_config(8, 4) == 0x0A09
    assert device.read_config(64, 4) == 0
    device.write_config(0, 1, 0xFF)
    assert device.read_config(0, 1) == 1


def test_config_update_bumps_generation_and_interrupts_a_running_driver(memory):
    device = EchoDevice(memory)
    driver = MockDriver(device, memory, 0x1000, 0x10000)
    device.update_config(bytes(10))
    assert device.config_generation == 1 and driver.interrupts == []
    driver.initialize()
    device.update_config(bytes(range(10)))
    assert device.config_generation == 2
    assert driver.interrupts == [(InterruptKind.CONFIG, None)]


def test_queue_configuration_is_frozen_while_ready(memory):
    device = EchoDevice(memory)
    driver = MockDriver(device, memory, 0x1000, 0x10000)
    driver.initialize()
    device.set_queue_size(0, 4)
    device.set_queue_address(0, RingPart.DEVICE, 0x8000)
    assert device.queue_size(0) == 16
    assert device.queue_address(0, RingPart.DEVICE) == driver.queues[0].used_ring
    assert device.queue_max_size(7) == 0 and device.queue_size(7) == 0
    device.notify(7)


def test_rings_outside_ram_at_driver_ok_set_needs_reset(memory):
    device = EchoDevice(memory)
    driver = MockDriver(device, memory, 0x1000, 0x10000)
    driver.negotiate()
    driver.setup_queue(0)
    device.set_queue_address(1, RingPart.DESCRIPTOR, memory.end - 16)
    device.set_queue_ready(1, True)
    device.write_status(ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK)
    assert device.status & DEVICE_NEEDS_RESET
    assert "queue 1" in device.last_error
    assert driver.interrupts == [(InterruptKind.CONFIG, None)]
    device.write_status(ACKNOWLEDGE)
    assert device.status & DEVICE_NEEDS_RESET, "the driver cannot clear NEEDS_RESET"
    device.write_status(0)
    assert device.status == 0 and device.last_error is None


def test_a_broken_chain_sets_needs_reset_and_stops_the_device(memory):
    device = EchoDevice(memory)
    driver = MockDriver(device, memory, 0x1000, 0x10000)
    driver.initialize()
    queue = driver.queues[0]
    driver.write_descriptor(queue, 0, 0x20000, 4, 1, 0)
    driver.make_available(queue, 0)
    driver.kick(0)
    assert driver.needs_reset
    assert driver.collect(0) == []
    driver.post_data(0, [b"x"], [])
    driver.kick(0)
    assert driver.collect(0) == [], "a device needing reset ignores its queues"
    assert device.stats()["needs_reset"] is True
    assert device.stats()["queues"][0]["notifications"] == 2


def test_requests_complete_with_stats_and_one_interrupt_per_batch(memory):
    device = EchoDevice(memory)
    driver = MockDriver(device, memory, 0x1000, 0x10000)
    driver.initialize(wanted=COMMON_FEATURES & ~(1 << VIRTIO_F_EVENT_IDX))
    heads = [driver.post_data(0, [b"abc"], [4])[0] for _ in range(3)]
    driver.kick(0)
    assert [c.head for c in driver.collect(0)] == heads
    assert driver.interrupts == [(InterruptKind.QUEUE, 0)]
    stats = device.stats()["queues"][0]
    assert stats == {
        "notifications": 1,
        "requests": 3,
        "bytes_from_guest": 9,
        "bytes_to_guest": 0,
        "interrupts": 1,
    }


def test_event_index_lets_the_driver_skip_kicks_and_interrupts(memory):
    device = VirtioRng(memory)
    driver = MockDriver(device, memory, 0x1000, 0x10000)
    driver.initialize()
    driver.post_data(0, [], [8])
    assert driver.should_kick(0, event_index=True)
    driver.kick(0)
    assert len(driver.collect(0)) == 1 and len(driver.interrupts) == 1
    driver.set_used_event(0, 5)
    driver.post_data(0, [], [8])
    assert driver.should_kick(0, event_index=True)
    driver.kick(0)
    assert len(driver.interrupts) == 1, "used_event 5 not reached: no interrupt"
