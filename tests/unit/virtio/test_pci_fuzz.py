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
from kvmlet.bus.pci.msi import RecordingMsiController
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
