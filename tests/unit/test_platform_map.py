"""The machine's platform map without KVM: KVM's in-kernel devices hold their ranges on the
bus, and the PCI host bridge forwards only the layout's windows."""

from __future__ import annotations

import pytest

from kvmlet.boot.memory_map import (
    HIGH_RAM_START,
    IOAPIC_ADDRESS,
    LAPIC_ADDRESS,
    MAX_RAM_SIZE,
    MIN_RAM_SIZE,
    PCI_MMIO_WINDOW,
    MemoryMap,
)
from kvmlet.bus import IoRegion, RecordingListener, mmio_space, port_io_space
from kvmlet.bus.pci import BarKind, PciDevice, PciHostBridge
from kvmlet.devices.irq import RecordingIrqLine
from kvmlet.errors import KvmletError
from kvmlet.machine.legacy import (
    attach_debug_exit,
    attach_legacy_devices,
    attach_pci_host_bridge,
    reserve_in_kernel_devices,
)

GiB = 1 << 30


class Registers:
    def read(self, offset, size):
        return 0x11

    def write(self, offset, size, value):
        pass


class Board:
    """What Machine wires on the bus before its devices, for a RAM size."""

    def __init__(self, ram: int = 256 << 20, *, windows: bool = True):
        self.io, self.mmio = port_io_space(), mmio_space()
        self.legacy = attach_legacy_devices(
            self.io, lambda irq: RecordingIrqLine(), lambda data: None, lambda: None
        )
        reserve_in_kernel_devices(self.io, self.mmio)
        if windows:
            self.bridge = attach_pci_host_bridge(self.io, self.mmio, MemoryMap(ram))
        else:  # a bridge forwarding everything: only the reservations hide a BAR
            self.bridge = PciHostBridge(self.io, self.mmio)
        self.listener = RecordingListener()
        self.mmio.add_listener(self.listener)
        self.io.add_listener(self.listener)
        self.device = PciDevice("dev", 0x1AF4, 0x1041, 0x020000)
        self.bar = IoRegion("dev-bar", 0x1000, Registers())
        self.bar.add_eventfd(0x10, 2, 77)
        self.device.add_bar(2, BarKind.MEM64, 0x1000, self.bar, True)
        self.io_bar = IoRegion("dev-io", 0x20, Registers())
        self.device.add_bar(0, BarKind.IO, 0x20, self.io_bar)
        self.bridge.attach(self.device, slot=1)
        self.device.set_command_bits(0x3)

    def place(self, address: int) -> None:
        self.device.program_bar(2, address)

    def doorbells(self) -> list[int]:
        return sorted(n.address for n in self.listener.notifiers if not n.port_io)


@pytest.mark.parametrize(
    ("address", "name"),
    [(IOAPIC_ADDRESS, "ioapic"), (LAPIC_ADDRESS, "lapic"), (LAPIC_ADDRESS + 0xFF0, "lapic")],
)
def test_a_bar_on_an_in_kernel_device_is_hidden_beneath_it(address, name):
    board = Board(windows=False)
    board.place(address & ~0xFFF)
    assert board.mmio.view.lookup(address).region.name == name
    assert board.doorbells() == []
    assert board.mmio.read(address, 4) == 0xFFFF_FFFF
    board.mmio.write(address, 4, 0)
    assert board.mmio.stats()["regions"][name] == {
        "reads": 1,
        "writes": 1,
        "bytes_read": 4,
        "bytes_written": 4,
    }
    board.place(PCI_MMIO_WINDOW.base)
    assert board.doorbells() == [PCI_MMIO_WINDOW.base + 0x10]
    assert board.mmio.read(PCI_MMIO_WINDOW.base, 4) == 0x11


@pytest.mark.parametrize(
    ("port", "name"),
    [(0x20, "pic-master"), (0x21, "pic-master"), (0xA1, "pic-slave"), (0x40, "pit"),
     (0x43, "pit"), (0x61, "pit-speaker"), (0x4D0, "elcr"), (0x4D1, "elcr")],
)  # fmt: skip
def test_the_in_kernel_ports_are_named_on_the_bus(port, name):
    board = Board()
    assert board.io.view.lookup(port).region.name == name
    assert board.io.read(port, 1) == 0xFF


def test_the_i8042_keeps_its_ports_around_the_speaker():
    board = Board()
    names = [board.io.view.lookup(port).region.name for port in range(0x60, 0x65)]
    assert names == ["i8042", "pit-speaker", "i8042", "i8042", "i8042"]


def test_a_debug_exit_port_on_the_pit_is_refused():
    board = Board()
    with pytest.raises(KvmletError, match="overlaps pit at 0x40"):
        attach_debug_exit(board.io, 0x40, lambda value, status: None)


def test_describe_names_the_in_kernel_devices():
    entries = {entry["name"]: entry for entry in Board().legacy.describe()}
    assert entries["ioapic"] == {
        "name": "ioapic",
        "type": "kvm-ioapic",
        "mmio_base": IOAPIC_ADDRESS,
    }
    assert entries["lapic"]["mmio_base"] == LAPIC_ADDRESS
    assert entries["pit"] == {"name": "pit", "type": "kvm-i8254", "port": 0x40}
    assert {"pic-master", "pic-slave", "elcr", "pit-speaker"} <= entries.keys()


@pytest.mark.parametrize(
    "address",
    [
        0x1000_0000,  # guest RAM
        0xBFFF_F000,  # just below the hole
        IOAPIC_ADDRESS,  # the 32-bit window ends at the IOAPIC
        0xFFFF_E000,  # below 4 GiB, above the local APIC
        1 << 39,  # past the 64-bit window
        (1 << 64) - 0x2000,
    ],
)
def test_a_bar_outside_the_windows_decodes_nowhere(address):
    board = Board()
    board.place(PCI_MMIO_WINDOW.base)
    board.place(address & ~0xFFF)
    assert not board.bar.enabled
    assert board.doorbells() == []
    assert board.mmio.view.lookup(PCI_MMIO_WINDOW.base).region is None


@pytest.mark.parametrize(
    "address", [PCI_MMIO_WINDOW.base, 0xFEBF_F000, 8 * GiB, (1 << 39) - 0x1000]
)
def test_a_bar_inside_a_window_decodes_there(address):
    board = Board(ram=2 * GiB)
    board.place(address)
    assert board.bar.enabled
    assert board.doorbells() == [address + 0x10]
    assert board.mmio.read(address, 4) == 0x11


def test_an_io_bar_below_the_pci_io_window_decodes_nowhere():
    board = Board()
    board.device.program_bar(0, 0x1000)
    assert board.io.view.lookup(0x1000).region.name == "dev-io"
    board.device.program_bar(0, 0x3E0)
    assert board.io.view.lookup(0x3E0).region is None
    assert not board.io_bar.enabled


@pytest.mark.parametrize("ram", [MIN_RAM_SIZE, 3 * GiB, 3 * GiB + 4096, 7 * GiB, MAX_RAM_SIZE])
def test_the_pci_windows_never_cover_ram_or_the_interrupt_controllers(ram):
    memory_map = MemoryMap(ram)
    windows = memory_map.pci_memory_windows()
    for window in windows:
        for base, size in memory_map.ram_banks():
            assert window.end <= base or base + size <= window.base
        assert not window.contains(IOAPIC_ADDRESS) and not window.contains(LAPIC_ADDRESS)
    assert windows[0].base <= PCI_MMIO_WINDOW.base and PCI_MMIO_WINDOW.end <= windows[0].end
    assert windows[1].base >= HIGH_RAM_START and windows[1].base % GiB == 0
    assert windows[1].end == 1 << 39


def test_a_region_placed_later_stays_beneath_an_in_kernel_device():
    board = Board()
    board.mmio.root.add_subregion(IOAPIC_ADDRESS, IoRegion("late", 0x1000, Registers()))
    assert board.mmio.view.lookup(IOAPIC_ADDRESS + 0xFF).region.name == "ioapic"
    assert board.mmio.view.lookup(IOAPIC_ADDRESS + 0x100).region.name == "late"
