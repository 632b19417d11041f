"""A hostile tiny guest of our own: it sweeps the ports, every PCI function's configuration
space, and the registers of the virtio BARs after moving them onto RAM, the interrupt
controllers, each other and the top of the address space.

Whatever it writes, the monitor must stay in control: the guest reaches its end and resets the
machine, no handler or device raised, KVM's slots and ioeventfds match the bus, guest RAM it
did not write is intact, and the machine shuts down with every descriptor closed.
"""

from __future__ import annotations

import random
import struct

import pytest

from kvmlet.boot.memory_map import VIRTIO_MMIO_DEVICE_SIZE, VIRTIO_MMIO_WINDOW
from kvmlet.machine.config import DiskConfig, MachineConfig
from kvmlet.machine.machine import Machine
from kvmlet.virtio import mmio as virtio_mmio
from kvmlet.virtio import pci_layout as layout
from kvmlet.virtio.blk import SECTOR_SIZE
from kvmlet.virtio.queue import VIRTQ_DESC_F_WRITE
from kvmlet.virtio.serving import ROUND_REQUESTS
from kvmlet.vstate.vcpu_loop import StopReason
from tests.helpers.tiny_guest import Op, config_read, config_write, table_guest, write_ops
from tests.unit.virtio.test_hostile_fuzz import AVAIL, DESC, USED, image_with, lay_out_chains

pytestmark = pytest.mark.kvm

CANARY = 32 << 20
CANARY_BYTES = bytes(range(256)) * 16
DONE = CANARY - 16
"""The guest's last operation stores a marker here: it got to the end of its table."""
I8042 = (0x60, 0x64)  # their writes reset the machine: swept for reads only


def port_sweep(generator: random.Random) -> list[Op]:
    """Every port below 0x1000 and 1,000 others: a read of each, then a write of each (all
    widths), skipping only the i8042's reset path."""
    ports = list(range(0x1000)) + [generator.randrange(0x1000, 0x10000) for _ in range(1000)]
    ops = [Op.inp(port, (1, 2, 4)[port % 3]) for port in ports]
    for port in ports:
        if port not in I8042:
            ops.append(Op.out(port, (1, 2, 4)[port % 3], generator.getrandbits(32)))
    return ops


def config_sweep(generator: random.Random, slots: int) -> list[Op]:
    """Every function's vendor id, then every dword of the devices present written with
    all-ones (sizing every BAR), read back, and written with random values."""
    ops = [op for slot in range(32) for fn in range(8) for op in config_read(slot, 0, 4, fn)]
    for slot in range(slots):
        for register in range(0, 0x100, 4):
            ops += config_write(slot, register, 4, 0xFFFF_FFFF)
            ops += config_read(slot, register)
            ops += config_write(slot, register, 4, generator.getrandbits(32))
    return ops


BAR_PLACES = (0x10_0000, 0xFEC0_0000, 0xFEE0_0000, 0xFFFF_8000, 0xD000_0000, 0xD000_0000, 0)


def start_device(bar: int, rings: list[tuple[int, int, int]]) -> list[Op]:
    """What a driver does through the common configuration: reset, features (VERSION_1,
    indirect descriptors, event index), then each queue at the given ring addresses, DRIVER_OK
    and a kick of every queue."""
    common = bar + layout.COMMON_OFFSET

    def field(offset: int, size: int, value: int) -> list[Op]:
        if size == 8:
            return [Op.store(common + offset, 4, value), Op.store(common + offset + 4, 4, 0)]
        return [Op.store(common + offset, size, value)]

    ops = field(layout.DEVICE_STATUS, 1, 0) + field(layout.DEVICE_STATUS, 1, 3)
    ops += field(layout.DRIVER_FEATURE_SELECT, 4, 1) + field(layout.DRIVER_FEATURE, 4, 1)
    ops += field(layout.DRIVER_FEATURE_SELECT, 4, 0)
    ops += field(layout.DRIVER_FEATURE, 4, 1 << 28 | 1 << 29) + field(layout.DEVICE_STATUS, 1, 11)
    for queue, (descriptors, driver, device) in enumerate(rings):
        ops += field(layout.QUEUE_SELECT, 2, queue) + field(layout.QUEUE_SIZE, 2, 8)
        ops += field(layout.QUEUE_DESC, 8, descriptors) + field(layout.QUEUE_DRIVER, 8, driver)
        ops += field(layout.QUEUE_DEVICE, 8, device) + field(layout.QUEUE_ENABLE, 2, 1)
    ops += field(layout.DEVICE_STATUS, 1, 15)
    for queue in range(len(rings)):
        notify = bar + layout.NOTIFY_OFFSET + layout.NOTIFY_OFF_MULTIPLIER * queue
        ops += [Op.store(notify, 2, queue)] * 3
    return ops


def hostile_rings(memory) -> list[tuple[int, int, int]]:
    """The disk's ring re-arms itself from the sectors it reads (tests/unit/virtio's fuzz
    layout at 0x1000); the entropy device's chains write random bytes over its own rings."""
    lay_out_chains(memory, [(AVAIL, SECTOR_SIZE, 0)])
    rng = 0x8000
    for slot in range(8):  # chains of one buffer each, over the descriptor table and rings
        target = rng + (0x40 * slot) % 0x300
        memory.write(rng + 16 * slot, struct.pack("<QIHH", target, 0x80, VIRTQ_DESC_F_WRITE, 0))
        memory.write_u16(rng + 0x100 + 4 + 2 * slot, slot)
    memory.write_u16(rng + 0x100 + 2, 8)
    return [(DESC, AVAIL, USED), (rng, rng + 0x100, rng + 0x200)]


def bar_sweep(generator: random.Random, slots: int) -> list[Op]:
    """Each device's BAR moved in turn onto RAM, the IOAPIC, the LAPIC, the top of the 32-bit
    space, one shared place (several devices at once) and nowhere, with memory decoding on; at
    each place the first 64 bytes of every page of the BAR written with all-ones, zeroes and
    random values, and read."""
    ops = []
    for place in BAR_PLACES:
        for slot in range(1, slots):
            ops += config_write(slot, 0x10, 4, place) + config_write(slot, 0x14, 4, 0)
            ops += config_write(slot, 0x04, 2, 0x0006)  # memory decoding and bus master on
        for offset in range(0, layout.BAR_SIZE, 0x1000):
            for register in range(offset, offset + 0x40, 4):
                for value in (0xFFFF_FFFF, 0, generator.getrandbits(32)):
                    ops.append(Op.store(place + register, 4, value))
                ops.append(Op.load(place + register, 4))
    return ops


def mmio_register_sweep(generator: random.Random, devices: int) -> list[Op]:
    """Every register of each virtio-mmio block written with all-ones, zeroes and random
    values (queue notifications, status, ring addresses included), and read."""
    ops = []
    for index in range(devices):
        base = VIRTIO_MMIO_WINDOW.base + index * VIRTIO_MMIO_DEVICE_SIZE
        for register in range(0, virtio_mmio.REGION_SIZE, 4):
            for value in (0xFFFF_FFFF, 0, generator.getrandbits(32)):
                ops.append(Op.store(base + register, 4, value))
            ops.append(Op.load(base + register, 4))
    return ops


def run_hostile(config: MachineConfig, ops: list[Op], devices_started: bool = False) -> Machine:
    machine = Machine(config)
    try:
        machine.memory.write(CANARY, CANARY_BYTES)
        if devices_started:
            disk_rings, rng_rings = hostile_rings(machine.memory)
            disk, _, rng = machine.virtio.transports
            start = start_device(disk.bar_address(0), [disk_rings])
            ops = start + start_device(rng.bar_address(0), [rng_rings]) + ops
        write_ops(machine.memory, [*ops, Op.store(DONE, 4, 0x600D)])
        machine.start()
        stop = machine.wait(300)
        assert stop.reason is StopReason.RESET, stop
        assert machine.memory.read_u32(DONE) == 0x600D, "the guest stopped before its end"
        assert machine.memory.read(CANARY, len(CANARY_BYTES)) == CANARY_BYTES
        stats = machine.stats()
        assert stats["port_io"]["handler_errors"] == 0
        assert stats["mmio"]["handler_errors"] == 0
        for worker in stats["virtio"]["workers"].values():
            assert worker["device_errors"] == 0
        assert all(device.device_errors == 0 for device in machine.virtio.devices)
        for space in (machine.io, machine.mmio):
            ioeventfds = {
                n for n in machine.kvm_listener.ioeventfds if n.address_space == space.name
            }
            assert ioeventfds == set(space.view.notifiers)
        assert set(machine.kvm_listener.slots) == set(machine.mmio.view.sections)
        if devices_started:
            disk_requests = machine.virtio.devices[0].queue_stats[0].requests
            assert disk_requests > ROUND_REQUESTS, "the disk's ring re-armed itself"
    finally:
        machine.close()
    assert not machine.virtio.left_open
    assert all(bell.eventfd == -1 for bell in machine.virtio._doorbells)
    return machine


def test_a_guest_sweeping_ports_config_space_and_bars_leaves_the_monitor_in_control():
    generator = random.Random(9)
    slots = 4  # the host bridge, the disk, the console, the entropy device
    ops = port_sweep(generator) + config_sweep(generator, slots) + bar_sweep(generator, slots)
    config = MachineConfig(
        boot_code=table_guest(),
        host_profile="none",
        console="virtio",
        disks=(DiskConfig(image_with(0, True)),),
    )
    run_hostile(config, ops, devices_started=True)


def test_a_guest_sweeping_virtio_mmio_registers_leaves_the_monitor_in_control(tmp_path):
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(1 << 20))
    config = MachineConfig(
        boot_code=table_guest(),
        host_profile="none",
        console="virtio",
        disks=(DiskConfig(disk),),
        virtio_transport="mmio",
    )
    run_hostile(config, mmio_register_sweep(random.Random(11), 3))
