"""9p shares on a real VM: each share is a virtio-9p function on the machine's PCI bus with its
mount tag, and requests rung through the machine's own doorbell are served by its worker,
both ways (the guest halts at once; the test plays the driver in guest RAM)."""

from __future__ import annotations

import time

import pytest

from kvmlet.machine.config import MachineConfig, ShareConfig
from kvmlet.machine.machine import Machine
from kvmlet.ninep import messages as m
from kvmlet.virtio.p9 import Virtio9p
from tests.helpers.virtio_driver import MockDriver

pytestmark = pytest.mark.kvm

HALT = bytes.fromhex("fa f4")  # cli ; hlt
ARENA = 16 << 20
REPLY_ROOM = 8192


def rpc(device, driver, message):
    head, (reply_address,) = driver.post_data(0, [m.encode(message)], [REPLY_ROOM])
    device.notify(0)  # what the guest's kick through the ioeventfd does
    deadline = time.monotonic() + 5
    while True:
        completions = {c.head: c.length for c in driver.collect(0)}
        if head in completions:
            return m.decode_response(driver.memory.read(reply_address, completions[head]))
        assert time.monotonic() < deadline, "the share's worker did not serve the request"
        time.sleep(0.002)


def test_a_share_is_served_both_ways_by_the_machines_worker(tmp_path):
    (tmp_path / "ro").mkdir()
    (tmp_path / "rw").mkdir()
    (tmp_path / "rw" / "from-host").write_bytes(b"host data")
    shares = (ShareConfig(tmp_path / "ro", "first", True), ShareConfig(tmp_path / "rw", "second"))
    config = MachineConfig(boot_code=HALT, host_profile="none", rng=False, shares=shares)
    with Machine(config) as machine:
        devices = machine.virtio.devices
        assert [type(device) for device in devices] == [Virtio9p, Virtio9p]
        described = machine.virtio.describe()
        assert [entry["type"] for entry in described] == ["virtio-9p", "virtio-9p"]
        assert [entry["pci_slot"] for entry in described] == [1, 2]
        device = devices[1]
        assert bytes(device.read_config(2 + i, 1) for i in range(6)) == b"second"
        driver = MockDriver(device, machine.memory, ARENA, 1 << 20, record_interrupts=False)
        driver.initialize()
        assert rpc(device, driver, m.Tversion(m.NOTAG, 65536, b"9P2000.L")).msize == 65536
        rpc(device, driver, m.Tattach(1, 0, m.NOFID, b"", b"", 0))
        rpc(device, driver, m.Twalk(2, 0, 1, (b"from-host",)))
        rpc(device, driver, m.Tlopen(3, 1, m.L_RDONLY))
        assert rpc(device, driver, m.Tread(4, 1, 0, 100)) == m.Rread(4, b"host data")
        rpc(device, driver, m.Twalk(5, 0, 2, ()))
        rpc(device, driver, m.Tlcreate(6, 2, b"from-guest", m.L_RDWR, 0o644, 0))
        assert rpc(device, driver, m.Twrite(7, 2, 0, b"guest data")).count == 10
        read_only = devices[0].server.share.read_only
    assert read_only
    assert (tmp_path / "rw" / "from-guest").read_bytes() == b"guest data"


def test_describe_names_the_root_share_and_its_type(tmp_path):
    root = ShareConfig(tmp_path, "kvmletroot", True)
    config = MachineConfig(boot_code=HALT, host_profile="none", rng=False, shares=(root,))
    with Machine(config) as machine:
        described = machine.describe()["root_filesystem"]
    assert described == {"type": "9p", "path": str(tmp_path), "read_only": True}
    with Machine(MachineConfig(boot_code=HALT, host_profile="none", rng=False)) as machine:
        assert machine.describe()["root_filesystem"] is None
