"""PciFunction through the host bridge's conf1 ports, as a guest drives it: identity, a
register BAR, INTx (with INTx-disable and the status bit) and MSI."""

from __future__ import annotations

import pytest

from kvmlet.bus import mmio_space, port_io_space
from kvmlet.bus.pci import BarAllocator, BarKind, PciHostBridge, PciWindow
from kvmlet.bus.pci import config_space as cfg
from kvmlet.devices import PciFunction, Register, RegisterBlock, test_context

SLOT = 3


class Widget(PciFunction):
    def __init__(self, context, msi=False, intx=True):
        super().__init__(
            context, vendor_id=0x6B76, device_id=0x42, class_code=0xFF0000, msi=msi, intx=intx
        )
        self.registers = RegisterBlock(0x24, [Register("value", 0x0), Register("id", 0x20)])
        self.add_register_bar(0, self.registers)
        self.add_register_bar(2, RegisterBlock(8, [Register("port", 0)]), kind=BarKind.IO)


class Guest:
    """The guest's side: conf1 configuration accesses, MMIO and port accesses."""

    def __init__(self, device):
        self.io, self.mmio = port_io_space(), mmio_space()
        bridge = PciHostBridge(self.io, self.mmio)
        bridge.attach(device, slot=SLOT)
        BarAllocator(
            PciWindow("io", 0x1000, 0x1000), PciWindow("mmio", 0xC000_0000, 0x1000_0000)
        ).assign(device)

    def config(self, offset, size=4, value=None):
        self.io.write(0xCF8, 4, 0x8000_0000 | SLOT << 11 | offset & 0xFC)
        port = 0xCFC + (offset & 3)
        if value is None:
            return self.io.read(port, size)
        self.io.write(port, size, value)
        return None


def test_identity_bars_and_registers_as_the_guest_sees_them():
    device = Widget(test_context("widget"))
    guest = Guest(device)
    assert guest.config(cfg.VENDOR_ID) == 0x0042_6B76
    assert guest.config(cfg.REVISION_ID) >> 8 == 0xFF0000
    assert guest.config(cfg.INTERRUPT_PIN, 1) == 1
    bar0 = guest.config(cfg.BAR0) & ~0xF
    guest.config(cfg.BAR0, value=0xFFFF_FFFF)
    assert guest.config(cfg.BAR0) == 0xFFFF_FFC0  # 0x24 bytes of registers: a 64-byte BAR
    guest.config(cfg.BAR0, value=bar0)
    guest.mmio.write(bar0, 4, 0x1234)
    assert device.registers["value"] == 0x1234
    assert guest.mmio.read(bar0 + 0x20, 4) == 0
    io_bar = guest.config(cfg.BAR0 + 8) & ~0x3
    guest.io.write(io_bar, 4, 0x55)
    assert guest.io.read(io_bar, 4) == 0x55
    assert device.bars[0].region.lock is device.context.lock is device.lock


def test_intx_follows_the_request_the_status_bit_and_intx_disable():
    context = test_context("widget")
    device = Widget(context)
    guest = Guest(device)
    device.raise_interrupt()
    assert context.irq.level and guest.config(cfg.STATUS, 2) & cfg.STATUS_INTERRUPT
    guest.config(cfg.COMMAND, 2, device.command | cfg.COMMAND_INTX_DISABLE)
    assert not context.irq.level
    assert guest.config(cfg.STATUS, 2) & cfg.STATUS_INTERRUPT  # still requested
    guest.config(cfg.COMMAND, 2, device.command & ~cfg.COMMAND_INTX_DISABLE)
    assert context.irq.level
    device.lower_interrupt()
    assert not context.irq.level and not guest.config(cfg.STATUS, 2) & cfg.STATUS_INTERRUPT
    assert context.irq.history == [True, False, True, False]


def test_msi_once_enabled_replaces_intx():
    context = test_context("widget")
    device = Widget(context, msi=True)
    guest = Guest(device)
    capability = guest.config(cfg.CAPABILITY_LIST, 1)
    assert guest.config(capability, 1) == 0x05  # MSI
    assert guest.config(capability + 2, 2) & 0x80  # 64-bit capable
    device.raise_interrupt()  # MSI disabled: INTx
    assert context.irq.level and not context.msi.vector(0).fired
    device.lower_interrupt()
    guest.config(capability + 4, value=0xFEE0_0000)
    guest.config(capability + 8, value=0)
    guest.config(capability + 12, 2, 0x41)
    guest.config(capability + 2, 2, 1)  # enable
    vector = context.msi.vector(0)
    assert vector.updates[-1] == (0xFEE0_0000, 0x41, False)
    device.raise_interrupt()
    assert vector.fired == [(0xFEE0_0000, 0x41)]
    assert context.irq.history == [True, False]  # INTx stayed low
    assert device.msi.fired == 1


def test_enabling_msi_deasserts_a_pending_intx_and_disabling_brings_it_back():
    context = test_context("widget")
    device = Widget(context, msi=True)
    guest = Guest(device)
    capability = guest.config(cfg.CAPABILITY_LIST, 1)
    device.raise_interrupt()
    assert context.irq.level
    guest.config(capability + 2, 2, 1)  # MSI on: INTx must not be used
    assert not context.irq.level
    guest.config(capability + 2, 2, 0)
    assert context.irq.level
    assert context.irq.history == [True, False, True]


def test_msi_needs_the_contexts_controller_and_no_intx_means_no_pin():
    context = test_context("widget")
    context.msi = None
    with pytest.raises(ValueError, match="MSI needs"):
        Widget(context, msi=True)
    quiet = Widget(test_context("quiet"), intx=False)
    quiet.raise_interrupt()
    assert quiet.config.get(cfg.INTERRUPT_PIN, 1) == 0 and quiet.context.irq.history == []
