"""virtio-pci (modern) through the bus, driven the way Linux's virtio_pci_modern does it.

Everything goes through guest-visible paths: configuration space through the host bridge's conf1
ports on a port-I/O space, the BAR through the MMIO space, rings through the mock driver's guest
memory. Interrupts land in a recording MSI controller or a recording INTx line.
"""

from __future__ import annotations

import os
import time

import pytest

from kvmlet.bus import RecordingListener, mmio_space, port_io_space
from kvmlet.bus.pci import CONF1_PORT, PciHostBridge
from kvmlet.bus.pci import config_space as cfg
from kvmlet.bus.pci.msi import NO_VECTOR, RecordingMsiController
from kvmlet.devices.irq import RecordingIrqLine
from kvmlet.virtio import pci_layout as layout
from kvmlet.virtio.console import VirtioConsole
from kvmlet.virtio.device import ACKNOWLEDGE, DRIVER, DRIVER_OK, FEATURES_OK
from kvmlet.virtio.pci import VirtioPci
from kvmlet.virtio.rng import VirtioRng
from kvmlet.virtio.worker import QueueWorker, doorbell
from tests.helpers.virtio_driver import MockDriver

SLOT = 3
BAR_ADDRESS = 0xE000_0000
MSI_ADDRESS = 0xFEE0_0000


class LinuxLikeDriver:
    """A virtio-pci device on a host bridge, probed over conf1 and its BAR like Linux does."""

    def __init__(self, device, memory, msi=None):
        self.device = device
        self.io, self.mmio = port_io_space(), mmio_space()
        self.listener = RecordingListener()
        self.mmio.add_listener(self.listener)
        self.bridge = PciHostBridge(self.io, self.mmio)
        self.msi = msi or RecordingMsiController()
        self.irq = RecordingIrqLine()
        self.pci = VirtioPci(device, self.msi, self.irq)
        self.devfn = self.bridge.attach(self.pci, slot=SLOT)
        self.rings = MockDriver(device, memory, 0x10000, 1 << 20, record_interrupts=False)
        self.caps: dict[int, int] = {}
        self.virtio_caps: dict[int, dict[str, int]] = {}
        self.bar = 0

    # Configuration space over conf1 ---------------------------------------------------------

    def config_read(self, offset, size=4):
        self.io.write(CONF1_PORT, 4, 0x8000_0000 | self.devfn << 8 | offset & 0xFC)
        return self.io.read(CONF1_PORT + 4 + (offset & 3), size)

    def config_write(self, offset, value, size=4):
        self.io.write(CONF1_PORT, 4, 0x8000_0000 | self.devfn << 8 | offset & 0xFC)
        self.io.write(CONF1_PORT + 4 + (offset & 3), size, value)

    def walk_capabilities(self):
        assert self.config_read(cfg.STATUS, 2) & cfg.STATUS_CAPABILITIES
        position, found = self.config_read(cfg.CAPABILITY_LIST, 1), []
        while position:
            found.append((self.config_read(position, 1), position))
            position = self.config_read(position + 1, 1)
        return found

    def size_and_program_bar(self, address=BAR_ADDRESS):
        """Linux's __pci_read_base: all-ones, read the mask back, then the address."""
        low = self.config_read(cfg.BAR0)
        assert low & 0x7 == 0x4, "a 64-bit memory BAR"
        self.config_write(cfg.BAR0, 0xFFFF_FFFF)
        self.config_write(cfg.BAR0 + 4, 0xFFFF_FFFF)
        mask = self.config_read(cfg.BAR0) & ~0xF | self.config_read(cfg.BAR0 + 4) << 32
        size = (~mask + 1) & 0xFFFF_FFFF_FFFF_FFFF
        self.config_write(cfg.BAR0, address & 0xFFFF_FFFF)
        self.config_write(cfg.BAR0 + 4, address >> 32)
        self.bar = address
        return size

    def enable(self, bits=cfg.COMMAND_MEMORY | cfg.COMMAND_BUS_MASTER):
        self.config_write(cfg.COMMAND, self.config_read(cfg.COMMAND, 2) | bits, size=2)

    def probe(self):
        """Identify, walk capabilities, place the BAR, read every virtio capability."""
        assert self.config_read(cfg.VENDOR_ID) == 0x1AF4 | (0x1040 + self.device.device_id) << 16
        for cap_id, position in self.walk_capabilities():
            self.caps.setdefault(cap_id, position)
            if cap_id == layout.VENDOR_CAPABILITY_ID:
                cfg_type = self.config_read(position + 3, 1)
                self.virtio_caps[cfg_type] = {
                    "position": position,
                    "length_field": self.config_read(position + 2, 1),
                    "bar": self.config_read(position + 4, 1),
                    "offset": self.config_read(position + 8),
                    "length": self.config_read(position + 12),
                    "multiplier": self.config_read(position + 16),
                }
        size = self.size_and_program_bar()
        self.enable()
        return size

    # MSI-X ------------------------------------------------------------------------------------

    def enable_msix(self, vectors):
        """pci_msix_enable: enable with the function masked, program entries, unmask all."""
        control = self.caps[0x11] + 2
        table = self.config_read(self.caps[0x11] + 4) & ~7
        self.config_write(control, 0xC000, size=2)
        for index in range(vectors):
            entry = self.bar + table + 16 * index
            self.mmio.write(entry, 4, MSI_ADDRESS)
            self.mmio.write(entry + 4, 4, 0)
            self.mmio.write(entry + 8, 4, 0x30 + index)
            self.mmio.write(entry + 12, 4, 0)
        self.config_write(control, 0x8000, size=2)

    # Virtio registers -------------------------------------------------------------------------

    def common(self, field):
        return self.bar + self.virtio_caps[layout.COMMON_CFG]["offset"] + field

    def read(self, field, size):
        return self.mmio.read(self.common(field), size)

    def write(self, field, value, size):
        self.mmio.write(self.common(field), size, value)

    def initialize(self, queue_size=16, msix=True):
        """virtio_pci_modern probe + virtio_dev_probe + vp_find_vqs."""
        self.write(layout.DEVICE_STATUS, 0, 1)
        assert self.read(layout.DEVICE_STATUS, 1) == 0
        self.write(layout.DEVICE_STATUS, ACKNOWLEDGE, 1)
        self.write(layout.DEVICE_STATUS, ACKNOWLEDGE | DRIVER, 1)
        features = 0
        for select in (0, 1):
            self.write(layout.DEVICE_FEATURE_SELECT, select, 4)
            features |= self.read(layout.DEVICE_FEATURE, 4) << (32 * select)
        for select in (0, 1):
            self.write(layout.DRIVER_FEATURE_SELECT, select, 4)
            self.write(layout.DRIVER_FEATURE, features >> (32 * select) & 0xFFFF_FFFF, 4)
        self.write(layout.DEVICE_STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK, 1)
        assert self.read(layout.DEVICE_STATUS, 1) & FEATURES_OK
        # vp_find_vqs: a vector per queue when the table has enough, else one shared by all.
        per_queue = self.pci.msix.vector_count > self.device.queue_count
        if msix:
            self.enable_msix(self.device.queue_count + 1 if per_queue else 2)
            self.write(layout.CONFIG_MSIX_VECTOR, 0, 2)
            assert self.read(layout.CONFIG_MSIX_VECTOR, 2) == 0
        assert self.read(layout.NUM_QUEUES, 2) == self.device.queue_count
        for index in range(self.device.queue_count):
            self.write(layout.QUEUE_SELECT, index, 2)
            assert self.read(layout.QUEUE_ENABLE, 2) == 0
            assert self.read(layout.QUEUE_SIZE, 2) >= queue_size
            queue = self.rings.layout_queue(index, queue_size)
            self.write(layout.QUEUE_SIZE, queue_size, 2)
            for field, address in (
                (layout.QUEUE_DESC, queue.descriptor_table),
                (layout.QUEUE_DRIVER, queue.available_ring),
                (layout.QUEUE_DEVICE, queue.used_ring),
            ):
                self.write(field, address & 0xFFFF_FFFF, 4)
                self.write(field + 4, address >> 32, 4)
            if msix:
                vector = 1 + index if per_queue else 1
                self.write(layout.QUEUE_MSIX_VECTOR, vector, 2)
                assert self.read(layout.QUEUE_MSIX_VECTOR, 2) == vector
            self.write(layout.QUEUE_ENABLE, 1, 2)
        self.write(layout.DEVICE_STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK, 1)
        return features

    def notify_address(self, queue_index):
        self.write(layout.QUEUE_SELECT, queue_index, 2)
        notify_off = self.read(layout.QUEUE_NOTIFY_OFF, 2)
        notify = self.virtio_caps[layout.NOTIFY_CFG]
        return self.bar + notify["offset"] + notify_off * notify["multiplier"]

    def kick(self, queue_index):
        self.mmio.write(self.notify_address(queue_index), 2, queue_index)

    def isr(self):
        return self.mmio.read(self.bar + self.virtio_caps[layout.ISR_CFG]["offset"], 1)

    def mask_entry(self, index, masked=True):
        """Set or clear the mask bit of MSI-X table entry `index`."""
        table = self.config_read(self.caps[0x11] + 4) & ~7
        self.mmio.write(self.bar + table + 16 * index + 12, 4, int(masked))

    def pending(self):
        """The MSI-X pending bits, as a set of vector indexes."""
        pba = self.bar + (self.config_read(self.caps[0x11] + 8) & ~7)
        bits = self.mmio.read(pba, 8)
        return {index for index in range(64) if bits >> index & 1}


@pytest.fixture
def rng(memory):
    return LinuxLikeDriver(VirtioRng(memory), memory)


def test_identity_in_configuration_space(rng):
    assert rng.config_read(cfg.VENDOR_ID, 2) == 0x1AF4
    assert rng.config_read(cfg.DEVICE_ID, 2) == 0x1044
    assert rng.config_read(cfg.REVISION_ID, 1) == 1
    assert rng.config_read(cfg.REVISION_ID, 4) >> 8 == 0xFF0000
    assert rng.config_read(cfg.SUBSYSTEM_VENDOR_ID, 2) == 0x1AF4
    assert rng.config_read(cfg.SUBSYSTEM_ID, 2) >= 0x40
    assert rng.config_read(cfg.INTERRUPT_PIN, 1) == 1
    assert rng.config_read(cfg.HEADER_TYPE, 1) == 0


def test_block_and_console_class_codes(memory):
    console = LinuxLikeDriver(VirtioConsole(memory, lambda data: None), memory)
    assert console.config_read(cfg.REVISION_ID, 4) >> 8 == 0x078000
    assert layout.class_code(2) == 0x010000


def test_probe_finds_every_capability_and_sizes_the_bar(rng):
    assert rng.probe() == layout.BAR_SIZE
    assert {layout.COMMON_CFG, layout.NOTIFY_CFG, layout.ISR_CFG, layout.PCI_CFG} <= set(
        rng.virtio_caps
    )
    assert layout.DEVICE_CFG not in rng.virtio_caps, "virtio-rng has no device configuration"
    assert 0x11 in rng.caps
    common = rng.virtio_caps[layout.COMMON_CFG]
    assert (common["bar"], common["offset"], common["length"]) == (0, 0, 0x38)
    assert common["length_field"] == 16
    notify = rng.virtio_caps[layout.NOTIFY_CFG]
    assert notify["length_field"] == 20 and notify["multiplier"] == 4
    assert rng.virtio_caps[layout.PCI_CFG]["length_field"] == 20
    msix_control = rng.config_read(rng.caps[0x11] + 2, 2)
    assert msix_control & 0x7FF == rng.device.queue_count, "table size is queues + 1"


def test_kick_runs_the_queue_and_fires_the_queue_vector(rng):
    rng.probe()
    rng.initialize()
    vectors = rng.msi.vectors
    assert (vectors[1].address, vectors[1].data, vectors[1].masked) == (MSI_ADDRESS, 0x31, False)
    head, _ = rng.rings.post_data(0, [], [64])
    rng.kick(0)
    assert [(c.head, c.length) for c in rng.rings.collect(0)] == [(head, 64)]
    assert vectors[1].fired == [(MSI_ADDRESS, 0x31)]
    assert vectors[0].fired == [], "no configuration change"
    assert rng.irq.history == [], "INTx stays quiet under MSI-X"
    assert rng.pci.stats()["notify_exits"] == 1


def test_a_masked_vector_becomes_pending_and_fires_on_unmask(rng):
    rng.probe()
    rng.initialize()
    table = rng.bar + layout.MSIX_TABLE_OFFSET
    pba = rng.bar + layout.MSIX_PBA_OFFSET
    rng.mmio.write(table + 16 + 12, 4, 1)
    rng.rings.post_data(0, [], [8])
    rng.kick(0)
    assert rng.msi.vectors[1].fired == []
    assert rng.mmio.read(pba, 8) == 0b10
    rng.mmio.write(table + 16 + 12, 4, 0)
    assert rng.msi.vectors[1].fired == [(MSI_ADDRESS, 0x31)]
    assert rng.mmio.read(pba, 4) == 0


def test_function_mask_holds_every_vector(rng):
    rng.probe()
    rng.initialize()
    control = rng.caps[0x11] + 2
    rng.config_write(control, 0xC000, size=2)
    rng.rings.post_data(0, [], [8])
    rng.kick(0)
    assert rng.msi.vectors[1].fired == []
    rng.config_write(control, 0x8000, size=2)
    assert len(rng.msi.vectors[1].fired) == 1


def test_unsupported_vectors_read_back_as_no_vector(rng):
    rng.probe()
    rng.write(layout.QUEUE_SELECT, 0, 2)
    rng.write(layout.QUEUE_MSIX_VECTOR, 7, 2)
    assert rng.read(layout.QUEUE_MSIX_VECTOR, 2) == NO_VECTOR
    rng.write(layout.CONFIG_MSIX_VECTOR, 2, 2)
    assert rng.read(layout.CONFIG_MSIX_VECTOR, 2) == NO_VECTOR
    rng.write(layout.QUEUE_SELECT, 5, 2)
    assert rng.read(layout.QUEUE_SIZE, 2) == 0, "no queue 5"
    assert rng.read(layout.QUEUE_MSIX_VECTOR, 2) == NO_VECTOR


def test_queue_addresses_and_reset(rng):
    rng.probe()
    rng.initialize()
    queue = rng.rings.queues[0]
    rng.write(layout.QUEUE_SELECT, 0, 2)
    assert rng.read(layout.QUEUE_DEVICE, 4) == queue.used_ring
    assert rng.read(layout.QUEUE_DESC + 4, 4) == 0
    assert rng.read(layout.QUEUE_ENABLE, 2) == 1
    assert rng.read(layout.CONFIG_GENERATION, 1) == rng.device.config_generation & 0xFF
    rng.write(layout.DEVICE_STATUS, 0, 1)
    assert rng.read(layout.DEVICE_STATUS, 1) == 0
    assert rng.read(layout.QUEUE_ENABLE, 2) == 0
    assert rng.read(layout.QUEUE_MSIX_VECTOR, 2) == NO_VECTOR
    assert rng.read(layout.CONFIG_MSIX_VECTOR, 2) == NO_VECTOR


def test_doorbells_follow_the_bar_and_go_with_memory_decoding(rng):
    bell = doorbell(rng.device, 0)
    try:
        rng.pci.add_doorbell(0, bell.eventfd)
        assert rng.listener.notifiers == set(), "the BAR is not decoded yet"
        rng.probe()
        [notifier] = rng.listener.notifiers
        assert (notifier.address, notifier.size, notifier.datamatch) == (
            rng.notify_address(0),
            2,
            None,
        )
        assert notifier.eventfd == bell.eventfd
        rng.config_write(cfg.COMMAND, cfg.COMMAND_BUS_MASTER, size=2)
        assert rng.listener.notifiers == set()
        rng.size_and_program_bar(0x1_2000_0000)
        rng.enable()
        [moved] = rng.listener.notifiers
        assert moved.address == 0x1_2000_0000 + layout.NOTIFY_OFFSET
        events = [kind for kind, _ in rng.listener.events]
        assert events == ["eventfd_added", "eventfd_removed", "eventfd_added"]
        rng.config_write(cfg.COMMAND, 0, size=2)
        assert rng.listener.notifiers == set()
    finally:
        bell.close()


def test_intx_with_isr_read_to_clear(rng):
    rng.probe()
    rng.initialize(msix=False)
    rng.rings.post_data(0, [], [16])
    rng.kick(0)
    assert rng.irq.level is True
    assert rng.config_read(cfg.STATUS, 2) & cfg.STATUS_INTERRUPT
    assert rng.isr() == layout.ISR_QUEUE
    assert rng.irq.level is False
    assert not rng.config_read(cfg.STATUS, 2) & cfg.STATUS_INTERRUPT
    assert rng.isr() == 0
    assert rng.msi.vectors[1].fired == []


def test_intx_disable_keeps_the_line_low_until_cleared(rng):
    rng.probe()
    rng.initialize(msix=False)
    rng.enable(cfg.COMMAND_INTX_DISABLE)
    rng.rings.post_data(0, [], [16])
    rng.kick(0)
    assert rng.irq.level is False
    assert rng.config_read(cfg.STATUS, 2) & cfg.STATUS_INTERRUPT, "status still shows it"
    rng.config_write(cfg.COMMAND, cfg.COMMAND_MEMORY | cfg.COMMAND_BUS_MASTER, size=2)
    assert rng.irq.level is True
    assert rng.isr() == layout.ISR_QUEUE and rng.irq.level is False


def test_console_config_change_through_device_cfg_and_isr(memory):
    console = LinuxLikeDriver(VirtioConsole(memory, lambda data: None), memory)
    console.probe()
    console.initialize(msix=False)
    device_cfg = console.bar + console.virtio_caps[layout.DEVICE_CFG]["offset"]
    assert console.mmio.read(device_cfg, 2) == 80
    generation = console.read(layout.CONFIG_GENERATION, 1)
    console.device.resize(100, 40)
    assert console.read(layout.CONFIG_GENERATION, 1) == (generation + 1) & 0xFF
    assert console.mmio.read(device_cfg, 4) == 100 | 40 << 16
    assert console.irq.level is True
    assert console.isr() == layout.ISR_CONFIG


def test_console_config_change_fires_the_config_vector(memory):
    console = LinuxLikeDriver(VirtioConsole(memory, lambda data: None), memory)
    console.probe()
    console.initialize()
    console.device.resize(90, 30)
    assert console.msi.vectors[0].fired == [(MSI_ADDRESS, 0x30)]


def test_pci_cfg_window_reaches_the_bar(rng):
    rng.probe()
    window = rng.virtio_caps[layout.PCI_CFG]["position"]
    rng.config_write(window + 4, 0, size=1)
    rng.config_write(window + 8, layout.NUM_QUEUES)
    rng.config_write(window + 12, 2)
    assert rng.config_read(window + 16, 2) == rng.device.queue_count
    rng.config_write(window + 8, layout.DEVICE_STATUS)
    rng.config_write(window + 12, 1)
    rng.config_write(window + 16, ACKNOWLEDGE, size=1)
    assert rng.read(layout.DEVICE_STATUS, 1) == ACKNOWLEDGE
    rng.config_write(window + 4, 3, size=1)
    rng.config_write(window + 16, 0, size=1)
    assert rng.read(layout.DEVICE_STATUS, 1) == ACKNOWLEDGE, "another BAR selects nothing"


def test_pci_cfg_window_refuses_a_misaligned_access(rng):
    """The window's offset must be a multiple of its length (virtio 1.2 §4.1.4.9): a 2-byte
    window at 0x13 would reach the status byte at 0x14 through the bus's splitting."""
    rng.probe()
    window = rng.virtio_caps[layout.PCI_CFG]["position"]
    rng.config_write(window + 4, 0, size=1)
    rng.config_write(window + 8, layout.DEVICE_STATUS - 1)
    rng.config_write(window + 12, 2)
    rng.config_write(window + 16, ACKNOWLEDGE << 8)
    assert rng.read(layout.DEVICE_STATUS, 1) == 0
    rng.config_write(window + 8, layout.NUM_QUEUES - 1)
    assert rng.config_read(window + 16) == ACKNOWLEDGE << 8, "the data register is left alone"


def test_odd_notify_writes_are_ignored_and_wide_ones_still_kick(rng):
    rng.probe()
    rng.initialize()
    rng.rings.post_data(0, [], [8])
    rng.mmio.write(rng.notify_address(0) + 1, 1, 0)
    assert rng.rings.collect(0) == []
    rng.mmio.write(rng.notify_address(0), 4, 0)
    assert len(rng.rings.collect(0)) == 1


def test_doorbell_eventfd_is_a_real_eventfd(rng):
    bell = doorbell(rng.device, 0)
    try:
        bell.ring()
        assert os.eventfd_read(bell.eventfd) == 1
    finally:
        bell.close()
    with pytest.raises(ValueError):
        doorbell(rng.device, 1)


def test_msix_table_takes_qwords_and_keeps_reserved_bits_zero(rng):
    rng.probe()
    entry = rng.bar + layout.MSIX_TABLE_OFFSET + 16
    rng.mmio.write(entry, 8, 0x1_FEE0_1000)
    rng.mmio.write(entry + 8, 8, 0xFFFF_FFFF << 32 | 0x4242)
    assert rng.mmio.read(entry, 8) == 0x1_FEE0_1000
    assert rng.mmio.read(entry + 8, 4) == 0x4242
    assert rng.mmio.read(entry + 12, 4) == 1, "only the mask bit of vector control exists"
    assert rng.mmio.read(entry, 2) == 0xFFFF, "byte and word accesses are not MSI-X accesses"
    assert rng.msi.vectors[1].updates[-1] == (0x1_FEE0_1000, 0x4242, True)


def test_doorbell_through_the_worker_fires_msix_with_no_notify_exit(rng):
    """The KVM path without KVM: the eventfd KVM would signal wakes the worker, which runs the
    queue and fires the MSI-X vector; the notify register itself is never reached."""
    rng.probe()
    rng.initialize()
    bell = doorbell(rng.device, 0)
    rng.pci.add_doorbell(0, bell.eventfd)
    worker = QueueWorker()
    worker.add(bell)
    worker.start()
    try:
        head, _ = rng.rings.post_data(0, [], [32])
        bell.ring()
        deadline = time.monotonic() + 5
        while not rng.msi.vectors[1].fired and time.monotonic() < deadline:
            time.sleep(0.001)
        assert rng.msi.vectors[1].fired == [(MSI_ADDRESS, 0x31)]
        assert [c.head for c in rng.rings.collect(0)] == [head]
        assert rng.pci.stats()["notify_exits"] == 0
    finally:
        worker.stop()
        bell.close()
