"""Fuzzing virtio-pci: arbitrary configuration-space and BAR accesses of every width.

Invariants: nothing raises out of the bus; the flat view never has overlapping ranges; the
doorbells a listener sees never overlap and are exactly the ones a decoded BAR shows; the INTx
line is high exactly when ISR is set and neither INTx-disable nor MSI-X is on.
"""

from __future__ import annotations

import itertools

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvmlet.bus import RecordingListener, mmio_space, port_io_space
from kvmlet.bus.pci import CONF1_PORT, PciHostBridge
from kvmlet.bus.pci import config_space as cfg
from kvmlet.bus.pci.msi import RecordingMsiController, RecordingVector
from kvmlet.devices.irq import RecordingIrqLine
from kvmlet.memory import GuestMemory
from kvmlet.virtio import pci_layout as layout
from kvmlet.virtio.console import VirtioConsole
from kvmlet.virtio.pci import VirtioPci

SLOT = 2
BAR_BASE = 0xC000_0000

_memory = GuestMemory.anonymous([(0, 1 << 20)])


def build():
    io, mmio = port_io_space(), mmio_space()
    listener = RecordingListener()
    mmio.add_listener(listener)
    bridge = PciHostBridge(io, mmio)
    device = VirtioConsole(_memory, lambda data: None)
    pci = VirtioPci(device, RecordingMsiController(), RecordingIrqLine())
    for queue in range(device.queue_count):
        pci.add_doorbell(queue, 100 + queue)
    bridge.attach(pci, slot=SLOT)
    pci.program_bar(0, BAR_BASE)
    pci.set_command_bits(0x6)
    return io, mmio, listener, pci


_sample = build()[3]
INTERESTING_OFFSETS = [
    0x04,  # command
    0x10,  # BAR low
    0x14,  # BAR high (config) / device status (BAR)
    _sample.msix.capability_offset + 2,  # MSI-X control
    _sample.pci_cfg_offset + 2 + layout.PCI_CFG_DATA,
    layout.ISR_OFFSET,
    layout.NOTIFY_OFFSET,
    layout.MSIX_TABLE_OFFSET + 12,
]

accesses = st.lists(
    st.tuples(
        st.sampled_from(["config", "bar", "conf1-address", "interrupt"]),
        st.one_of(st.integers(0, 0x7FFF), st.sampled_from(INTERESTING_OFFSETS)),
        st.sampled_from([1, 2, 4, 8]),
        st.booleans(),
        st.integers(0, (1 << 64) - 1),
    ),
    min_size=10,
    max_size=60,
)


def check_invariants(mmio, listener, pci):
    ranges = mmio.view.ranges
    for before, after in itertools.pairwise(ranges):
        assert before.end <= after.start
    notifiers = sorted(listener.notifiers, key=lambda n: n.address)
    for before, after in itertools.pairwise(notifiers):
        assert before.address + before.size <= after.address
    intx_disabled = pci.command & cfg.COMMAND_INTX_DISABLE
    assert pci.irq.level == (bool(pci.isr) and not intx_disabled and not pci.msix.enabled)
    base = pci.decoded_address(pci.bars[0])
    if base is None:
        assert not notifiers
    else:
        expected = {base + layout.NOTIFY_OFFSET + 4 * q for q in range(pci.device.queue_count)}
        assert {n.address for n in notifiers} == expected


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(accesses)
def test_arbitrary_accesses_never_raise_or_overlap(operations):
    io, mmio, listener, pci = build()
    for target, offset, size, is_write, value in operations:
        value &= (1 << (8 * size)) - 1
        if target == "interrupt":
            pci.device.signal_config()
        elif target == "conf1-address":
            io.write(CONF1_PORT, 4, 0x8000_0000 | SLOT << 11 | offset & 0xFC)
            port = CONF1_PORT + 4 + (offset & 3)
            if is_write:
                io.write(port, min(size, 4), value & 0xFFFF_FFFF)
            else:
                io.read(port, min(size, 4))
        elif target == "config":
            if is_write:
                pci.config_write(offset & 0xFF, size, value)
            else:
                pci.config_read(offset & 0xFF, size)
        else:
            base = pci.decoded_address(pci.bars[0]) or BAR_BASE
            if is_write:
                mmio.write(base + offset, size, value)
            else:
                mmio.read(base + offset, size)
        check_invariants(mmio, listener, pci)
    assert mmio.handler_errors == 0 and io.handler_errors == 0


def test_fuzz_harness_starts_with_every_doorbell_mapped():
    _, mmio, listener, pci = build()
    check_invariants(mmio, listener, pci)
    assert len(listener.notifiers) == pci.device.queue_count


class StrictVector(RecordingVector):
    """Fails the test if the device fires it while the guest has it masked."""

    def fire(self) -> None:
        assert not self.masked, "a masked vector fired"
        super().fire()


class StrictController(RecordingMsiController):
    def vector(self, index):
        return self.vectors.setdefault(index, StrictVector())


msix_operations = st.lists(
    st.tuples(
        st.sampled_from(["signal", "mask", "unmask", "function-mask", "enable", "program"]),
        st.integers(0, 3),
        st.booleans(),
    ),
    max_size=40,
)


class MsixModel:
    """What the guest is owed: a signal to an unmasked vector is one delivery; to a masked one
    it is one pending delivery (however many signals) made when the vector is unmasked."""

    def __init__(self, count):
        self.enabled = self.function_masked = False
        self.entry_masked = [True] * count
        self.pending = [False] * count
        self.deliveries = [0] * count

    def masked(self, index):
        return not self.enabled or self.function_masked or self.entry_masked[index]

    def signal(self, index):
        if self.masked(index):
            self.pending[index] = True
        else:
            self.deliveries[index] += 1

    def settle(self):
        for index, pending in enumerate(self.pending):
            if pending and not self.masked(index):
                self.pending[index] = False
                self.deliveries[index] += 1


@settings(max_examples=200, deadline=None)
@given(msix_operations)
def test_msix_delivers_exactly_what_the_guest_is_owed(operations):
    """Against a model: deliveries and pending bits match after every step, a masked vector
    never fires, and unmasking everything at the end leaves nothing pending."""
    controller = StrictController()
    pci = VirtioPci(VirtioConsole(_memory, lambda data: None), controller, RecordingIrqLine())
    msix, control = pci.msix, pci.msix.capability_offset + 2
    model = MsixModel(msix.vector_count)

    def set_control(enable, function_mask):
        pci.config_write(control, 2, 0x8000 * enable | 0x4000 * function_mask)
        model.enabled, model.function_masked = enable, function_mask

    for operation, index, flag in operations:
        index %= msix.vector_count
        entry = 16 * index
        if operation == "signal":
            msix.signal(index)
            model.signal(index)
        elif operation in ("mask", "unmask"):
            msix.table_write(entry + 12, 4, int(operation == "mask"))
            model.entry_masked[index] = operation == "mask"
        elif operation == "program":
            msix.table_write(entry, 4, 0xFEE0_0000 | index << 12)
            msix.table_write(entry + 8, 4, 0x30 + index + 16 * flag)
        elif operation == "enable":
            set_control(flag, model.function_masked)
        else:
            set_control(model.enabled, flag)
        model.settle()
        assert msix.fired == model.deliveries
        assert msix.pending == model.pending
    set_control(True, False)
    for index in range(msix.vector_count):
        msix.table_write(16 * index + 12, 4, 0)
        model.entry_masked[index] = False
    model.settle()
    assert msix.pba_read(0, 8) == 0
    assert msix.fired == model.deliveries
    assert [len(controller.vectors[i].fired) for i in range(msix.vector_count)] == msix.fired
