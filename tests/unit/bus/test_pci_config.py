"""PCI through conf1: header fields, BAR sizing and mapping, command enables, W1C status,
capabilities, multi-function, absent functions, the allocator, and doorbells following BARs."""

from __future__ import annotations

import pytest

from kvmlet.bus import IoRegion, RecordingListener, mmio_space, port_io_space
from kvmlet.bus.pci import BarAllocator, BarKind, PciDevice, PciHostBridge, PciWindow
from kvmlet.bus.pci import config_space as cfg
from kvmlet.errors import KvmletError


class Null:
    def read(self, offset, size):
        return 0x5A5A5A5A & ((1 << (8 * size)) - 1)

    def write(self, offset, size, value):
        pass


class Machine:
    """Port I/O + MMIO spaces with a host bridge, driven as a guest would."""

    def __init__(self) -> None:
        self.io = port_io_space()
        self.mmio = mmio_space()
        self.host = PciHostBridge(self.io, self.mmio)

    def select(self, slot: int, register: int, function: int = 0, bus: int = 0) -> None:
        address = 0x8000_0000 | bus << 16 | slot << 11 | function << 8 | (register & 0xFC)
        self.io.write(0xCF8, 4, address)

    def read(self, slot: int, register: int, size: int = 4, function: int = 0) -> int:
        self.select(slot, register, function)
        return self.io.read(0xCFC + (register & 3), size)

    def write(self, slot: int, register: int, size: int, value: int, function: int = 0) -> None:
        self.select(slot, register, function)
        self.io.write(0xCFC + (register & 3), size, value)


def make_device(name: str = "dev") -> PciDevice:
    device = PciDevice(
        name,
        0x1AF4,
        0x1041,
        0x020000,
        revision=1,
        subsystem_vendor_id=0x1AF4,
        subsystem_id=0x1100,
        interrupt_pin=1,
    )
    device.add_bar(0, BarKind.IO, 0x20, IoRegion(f"{name}-io", 0x20, Null()))
    device.add_bar(1, BarKind.MEM32, 0x1000, IoRegion(f"{name}-mmio", 0x1000, Null()))
    device.add_bar(2, BarKind.MEM64, 0x4000, IoRegion(f"{name}-64", 0x4000, Null()), True)
    return device


@pytest.fixture
def machine() -> Machine:
    return Machine()


def test_host_bridge_is_device_zero_and_conf1_address_reads_back(machine):
    assert machine.read(0, 0) == 0x1237_8086
    assert machine.read(0, 0x08) >> 8 == 0x060000
    assert machine.read(0, 0x02, 2) == 0x1237
    assert machine.read(0, 0x01, 1) == 0x80
    machine.io.write(0xCF8, 4, 0x8000_0000)
    assert machine.io.read(0xCF8, 4) == 0x8000_0000


def test_byte_accesses_to_the_address_port_leave_it_alone(machine):
    machine.io.write(0xCF8, 4, 0x8000_0000)
    machine.io.write(0xCFB, 1, 0x01)
    assert machine.io.read(0xCF8, 4) == 0x8000_0000
    assert machine.io.read(0xCF9, 1) == 0xFF


def test_absent_functions_other_buses_and_disabled_address_read_all_ones(machine):
    assert machine.read(5, 0) == 0xFFFF_FFFF
    assert machine.read(0, 0, function=3) == 0xFFFF_FFFF
    machine.io.write(0xCF8, 4, 0x8001_0000)
    assert machine.io.read(0xCFC, 4) == 0xFFFF_FFFF
    machine.io.write(0xCF8, 4, 0x0000_0000)
    assert machine.io.read(0xCFC, 2) == 0xFFFF


def test_header_fields_and_read_only_ids(machine):
    machine.host.attach(make_device(), slot=3)
    assert machine.read(3, 0) == 0x1041_1AF4
    assert machine.read(3, 0x2C) == 0x1100_1AF4
    assert machine.read(3, 0x3D, 1) == 1
    machine.write(3, 0, 4, 0)
    assert machine.read(3, 0) == 0x1041_1AF4
    machine.write(3, 0x3C, 1, 11)
    assert machine.read(3, 0x3C, 1) == 11


def test_bar_sizing_reads_back_size_masks_and_type_bits(machine):
    machine.host.attach(make_device(), slot=3)
    for register, expected in (
        (0x10, 0xFFFF_FFE1),
        (0x14, 0xFFFF_F000),
        (0x18, 0xFFFF_C00C),
        (0x1C, 0xFFFF_FFFF),
        (0x20, 0),
    ):
        machine.write(3, register, 4, 0xFFFF_FFFF)
        assert machine.read(3, register) == expected, hex(register)


def test_command_enables_map_and_unmap_bars(machine):
    device = make_device()
    machine.host.attach(device, slot=3)
    machine.write(3, 0x10, 4, 0xC000)
    machine.write(3, 0x14, 4, 0xFEB0_0000)
    machine.write(3, 0x18, 4, 0x0000_0000)
    machine.write(3, 0x1C, 4, 0x1)
    assert machine.io.read(0xC000, 4) == 0xFFFF_FFFF
    machine.write(3, 0x04, 2, cfg.COMMAND_IO)
    assert machine.io.read(0xC000, 4) == 0x5A5A5A5A
    assert machine.mmio.read(0xFEB0_0000, 4) == 0xFFFF_FFFF
    machine.write(3, 0x04, 2, cfg.COMMAND_IO | cfg.COMMAND_MEMORY)
    assert machine.mmio.read(0xFEB0_0000, 4) == 0x5A5A5A5A
    assert machine.mmio.read(0x1_0000_0000, 4) == 0x5A5A5A5A
    machine.write(3, 0x14, 4, 0xFEC0_0000)
    assert machine.mmio.read(0xFEB0_0000, 4) == 0xFFFF_FFFF
    assert machine.mmio.read(0xFEC0_0FFC, 4) == 0x5A5A5A5A
    machine.write(3, 0x04, 2, 0)
    assert machine.io.view.lookup(0xC000).region is None
    assert machine.mmio.view.assigned() == []


def test_command_hook_sees_bus_master_and_intx_disable(machine):
    changes = []

    class Hooked(PciDevice):
        def command_changed(self, old, new):
            changes.append((old, new))

    machine.host.attach(Hooked("h", 1, 2, 0xFF0000), slot=4)
    machine.write(4, 0x04, 2, cfg.COMMAND_BUS_MASTER | cfg.COMMAND_INTX_DISABLE | 0xF000)
    assert changes == [(0, cfg.COMMAND_BUS_MASTER | cfg.COMMAND_INTX_DISABLE)]


def test_status_error_bits_are_write_one_to_clear(machine):
    device = make_device()
    machine.host.attach(device, slot=3)
    device.config.set(cfg.STATUS, 2, 0xF900 | cfg.STATUS_CAPABILITIES)
    machine.write(3, 0x06, 2, 0x2000)
    assert machine.read(3, 0x06, 2) == 0xD900 | cfg.STATUS_CAPABILITIES
    machine.write(3, 0x06, 2, 0)
    assert machine.read(3, 0x06, 2) == 0xD900 | cfg.STATUS_CAPABILITIES


def test_interrupt_status_bit_is_device_controlled(machine):
    device = make_device()
    machine.host.attach(device, slot=3)
    device.set_interrupt_status(True)
    assert machine.read(3, 0x06, 2) & cfg.STATUS_INTERRUPT
    machine.write(3, 0x06, 2, 0xFFFF)
    assert machine.read(3, 0x06, 2) & cfg.STATUS_INTERRUPT
    device.set_interrupt_status(False)
    assert not machine.read(3, 0x06, 2) & cfg.STATUS_INTERRUPT


def test_capability_list_masks_and_write_callback(machine):
    device = make_device()
    writes = []
    first = device.add_capability(0x09, b"\x10\x00\x00\x00")
    second = device.add_capability(
        0x11,
        b"\x03\x00\x01\x00\x00\x00",
        b"\x00\xc0\x00\x00\x00\x00",
        on_write=lambda *write: writes.append(write),
    )
    machine.host.attach(device, slot=3)
    assert machine.read(3, 0x06, 2) & cfg.STATUS_CAPABILITIES
    assert machine.read(3, 0x34, 1) == first == 0x40
    assert machine.read(3, first, 2) == second << 8 | 0x09
    assert machine.read(3, second, 2) == 0x0011
    machine.write(3, second + 2, 2, 0xFFFF)
    assert machine.read(3, second + 2, 2) == 0xC003
    assert writes == [(2, 2, 0xFFFF)]
    machine.write(3, first, 4, 0)
    assert machine.read(3, first, 2) == second << 8 | 0x09


def test_multifunction_bit_set_when_other_functions_exist(machine):
    machine.host.attach(make_device("f0"), slot=2)
    assert machine.read(2, 0x0E, 1) == 0
    machine.host.attach(make_device("f1"), slot=2, function=1)
    assert machine.read(2, 0x0E, 1) == cfg.HEADER_TYPE_MULTIFUNCTION
    assert machine.read(2, 0, function=1) == 0x1041_1AF4


def test_bad_bar_declarations_are_refused():
    device = PciDevice("d", 1, 2, 0)
    region = IoRegion("r", 0x1000, Null())
    with pytest.raises(ValueError):
        device.add_bar(0, BarKind.MEM32, 0x1800, region)
    with pytest.raises(ValueError):
        device.add_bar(5, BarKind.MEM64, 0x1000, region)
    device.add_bar(0, BarKind.MEM64, 0x1000, region)
    with pytest.raises(ValueError):
        device.add_bar(1, BarKind.MEM32, 0x1000, IoRegion("s", 0x1000, Null()))


def test_allocator_assigns_aligned_bars_inside_windows_and_enables_decode(machine):
    device = make_device()
    machine.host.attach(device, slot=3)
    allocator = BarAllocator(
        PciWindow("io", 0xC000, 0x1000), PciWindow("mmio32", 0xE000_0000, 0x1000_0000)
    )
    assigned = allocator.assign(device)
    assert assigned == {2: 0xE000_0000, 1: 0xE000_4000, 0: 0xC000}
    assert machine.read(3, 0x04, 2) & (cfg.COMMAND_IO | cfg.COMMAND_MEMORY) == 3
    assert machine.read(3, 0x18) == 0xE000_000C
    assert machine.mmio.read(0xE000_4000, 4) == 0x5A5A5A5A
    assert machine.io.read(0xC01C, 4) == 0x5A5A5A5A
    with pytest.raises(KvmletError):
        PciWindow("tiny", 0x1000, 0x100).allocate(0x1000)


def test_doorbells_follow_a_bar_through_moves_and_disables(machine):
    device = make_device()
    machine.host.attach(device, slot=3)
    bar_region = device.bars[1].region
    bar_region.add_eventfd(0x10, 2, 42, datamatch=None)
    bar_region.add_eventfd(0x20, 4, 43, datamatch=7)
    io_region = device.bars[0].region
    io_region.add_eventfd(0x8, 2, 44)
    listener = RecordingListener()
    machine.mmio.add_listener(listener)
    io_listener = RecordingListener()
    machine.io.add_listener(io_listener)

    def doorbells():
        return sorted((n.address, n.size, n.datamatch, n.eventfd) for n in listener.notifiers)

    assert doorbells() == []
    machine.write(3, 0x14, 4, 0xFEB0_0000)
    machine.write(3, 0x10, 4, 0xC000)
    machine.write(3, 0x04, 2, cfg.COMMAND_MEMORY | cfg.COMMAND_IO)
    assert doorbells() == [(0xFEB0_0010, 2, None, 42), (0xFEB0_0020, 4, 7, 43)]
    assert [(n.address, n.port_io) for n in io_listener.notifiers] == [(0xC008, True)]
    listener.events.clear()
    machine.write(3, 0x14, 4, 0xFEC0_0000)
    assert doorbells() == [(0xFEC0_0010, 2, None, 42), (0xFEC0_0020, 4, 7, 43)]
    assert [kind for kind, _ in listener.events] == ["eventfd_removed"] * 2 + ["eventfd_added"] * 2
    machine.write(3, 0x04, 2, cfg.COMMAND_IO)
    assert doorbells() == []
    machine.write(3, 0x04, 2, cfg.COMMAND_MEMORY | cfg.COMMAND_IO)
    assert doorbells() == [(0xFEC0_0010, 2, None, 42), (0xFEC0_0020, 4, 7, 43)]
    bar_region.remove_eventfd(0x20, 4, 43, datamatch=7)
    assert doorbells() == [(0xFEC0_0010, 2, None, 42)]
    late = RecordingListener()
    machine.mmio.add_listener(late)
    assert late.notifiers == listener.notifiers


def test_a_bar_the_guest_maps_onto_another_loses_there(machine):
    """Two devices' BARs on one address: the one already decoding there keeps it (registers and
    doorbell), whichever device was attached first; the newcomer shows again once it is alone."""
    first, second = make_device("first"), make_device("second")
    machine.host.attach(first, slot=3)
    machine.host.attach(second, slot=4)
    for device, eventfd in ((first, 71), (second, 72)):
        device.bars[1].region.add_eventfd(0x10, 2, eventfd)
    listener = RecordingListener()
    machine.mmio.add_listener(listener)

    def at(address):
        region = machine.mmio.view.lookup(address).region
        return region.name if region is not None else None

    def doorbells():
        return sorted((n.address, n.eventfd) for n in listener.notifiers)

    for slot, address in ((4, 0xFEB0_0000), (3, 0xFEC0_0000)):
        machine.write(slot, 0x14, 4, address)
        machine.write(slot, 0x04, 2, cfg.COMMAND_MEMORY)
    machine.write(3, 0x14, 4, 0xFEB0_0000)  # the first device moves onto the second's BAR
    assert at(0xFEB0_0000) == "second-mmio"
    assert doorbells() == [(0xFEB0_0010, 72)]
    machine.write(4, 0x14, 4, 0xFED0_0000)  # the second leaves: the first shows
    assert (at(0xFEB0_0000), at(0xFED0_0000)) == ("first-mmio", "second-mmio")
    assert doorbells() == [(0xFEB0_0010, 71), (0xFED0_0010, 72)]
    machine.write(4, 0x14, 4, 0xFEB0_0000)  # and back onto the first: the second loses now
    assert at(0xFEB0_0000) == "first-mmio"
    assert doorbells() == [(0xFEB0_0010, 71)]
