"""A guest moves virtio-pci BARs while KVM holds their doorbells as ioeventfds, then kicks.

The guest is the table-driven tiny guest (tests/helpers/tiny_guest.py): it programs BARs through
conf1 and writes notify registers; the test plays the driver's rings in guest RAM. A kick that
lands on an ioeventfd never exits to Python (`notify_exits` stays 0), so each test also shows
that KVM's ioeventfds followed the bus exactly.
"""

from __future__ import annotations

import time

import pytest

from kvmlet.machine.config import DiskConfig, MachineConfig
from kvmlet.machine.machine import Machine
from kvmlet.virtio import pci_layout as layout
from kvmlet.virtio.blk import VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN
from kvmlet.vstate.vcpu_loop import StopReason
from tests.helpers.tiny_guest import Op, config_write, table_guest, write_ops
from tests.helpers.virtio_driver import MockDriver

pytestmark = pytest.mark.kvm

ARENA = 16 << 20
NEW_BAR = 0xD000_0000


def wait_for(condition, timeout=10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.002)
    return True


def move_bar(slot: int, address: int) -> list[Op]:
    """Program the 64-bit memory BAR 0 of the function in `slot`."""
    return config_write(slot, 0x10, 4, address & 0xFFFF_FFFF) + config_write(
        slot, 0x14, 4, address >> 32
    )


def kick(bar: int, queue: int = 0) -> Op:
    return Op.store(bar + layout.NOTIFY_OFFSET + layout.NOTIFY_OFF_MULTIPLIER * queue, 2, queue)


def run(machine: Machine, ops: list[Op]) -> None:
    write_ops(machine.memory, ops)
    machine.start()
    assert machine.wait(30).reason is StopReason.RESET


def kvm_follows_the_bus(machine: Machine) -> None:
    assert machine.kvm_listener.ioeventfds == set(machine.mmio.view.notifiers)
    assert set(machine.kvm_listener.slots) == set(machine.mmio.view.sections)
    assert machine.mmio.stats()["listener_errors"] == 0
    addresses = [n.address for n in machine.mmio.view.notifiers]
    assert len(addresses) == len(set(addresses))


def test_a_kick_at_a_moved_bar_reaches_the_device_through_its_ioeventfd():
    machine = Machine(MachineConfig(boot_code=table_guest(), host_profile="none"))
    try:
        (transport,) = machine.virtio.transports
        old_bar = transport.bar_address(0)
        driver = MockDriver(transport.device, machine.memory, ARENA, 1 << 20, False)
        driver.initialize()
        head, _ = driver.post_data(0, [], [64])
        run(machine, [*move_bar(1, NEW_BAR), kick(NEW_BAR), kick(old_bar)])
        done = []
        assert wait_for(lambda: done.extend(driver.collect(0)) or done)
        assert [c.head for c in done] == [head]
        assert transport.stats()["notify_exits"] == 0, "the kick exited instead"
        assert old_bar + layout.NOTIFY_OFFSET in machine.mmio.stats()["unassigned_writes"]
        kvm_follows_the_bus(machine)
    finally:
        machine.close()


def test_a_bar_moved_onto_another_loses_and_kicks_reach_the_device_already_there(tmp_path):
    image = tmp_path / "disk.img"
    image.write_bytes(b"\x5a" * (1 << 20))
    config = MachineConfig(boot_code=table_guest(), host_profile="none", disks=(DiskConfig(image),))
    machine = Machine(config)
    try:
        disk, rng = machine.virtio.transports
        shared = disk.bar_address(0)
        disk_driver = MockDriver(disk.device, machine.memory, ARENA, 1 << 20, False)
        rng_driver = MockDriver(rng.device, machine.memory, ARENA + (1 << 20), 1 << 20, False)
        disk_driver.initialize()
        rng_driver.initialize()
        header = VIRTIO_BLK_T_IN.to_bytes(4, "little") + bytes(12)
        disk_head, (data, status) = disk_driver.post_data(0, [header], [512, 1])
        rng_head, _ = rng_driver.post_data(0, [], [64])
        ops = [*move_bar(2, shared), kick(shared)]  # the entropy device's BAR onto the disk's
        ops += [*move_bar(1, NEW_BAR), kick(shared)]  # the disk leaves: the entropy device shows
        run(machine, ops)
        done = {"disk": [], "rng": []}

        def both_served():
            done["disk"] += disk_driver.collect(0)
            done["rng"] += rng_driver.collect(0)
            return done["disk"] and done["rng"]

        assert wait_for(both_served)
        assert [c.head for c in done["disk"]] == [disk_head]
        assert [c.head for c in done["rng"]] == [rng_head]
        assert machine.memory.read(data, 512) == b"\x5a" * 512
        assert machine.memory.read_u8(status) == VIRTIO_BLK_S_OK
        assert disk.stats()["notify_exits"] == rng.stats()["notify_exits"] == 0
        assert machine.mmio.view.lookup(shared).region.name.startswith("virtio-rng")
        kvm_follows_the_bus(machine)
    finally:
        machine.close()
