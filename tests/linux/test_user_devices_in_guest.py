"""A device model of the user's own as Linux sees it: a PCI function hot-added to a running
guest appears to `echo 1 > /sys/bus/pci/rescan` with the BAR kvmlet assigned it."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvmlet import DeviceConfig
from kvmlet.guest import READY_MARKER
from kvmlet.machine.machine import Machine
from tests.helpers.guests import BOOT_TIMEOUT

pytestmark = pytest.mark.linux

DIGEST = f"{Path(__file__).resolve().parents[2]}/examples/pci_digest.py:PciDigest"


def test_a_hot_added_pci_function_appears_to_a_rescan(guest_config):
    with Machine(guest_config) as machine:
        machine.console.wait_for(READY_MARKER, BOOT_TIMEOUT, lambda: machine.running)
        machine.console.write("ls /sys/bus/pci/devices; echo listed\n")
        machine.console.wait_for("listed", 60, lambda: machine.running)
        assert "0000:00:02.0" not in machine.console.text()  # 00:01.0 is virtio-rng
        device = machine.add_device(DeviceConfig.pci(DIGEST))
        (number,) = [n for n, f in machine.pci.bus.functions.items() if f is device]
        slot = f"/sys/bus/pci/devices/0000:00:{number >> 3:02x}.{number & 7}"
        machine.console.write(
            f"echo 1 > /sys/bus/pci/rescan; cat {slot}/vendor {slot}/device; "
            f"head -n 1 {slot}/resource; echo rescanned\n"
        )
        match = machine.console.wait_for(
            r"(0x\w+)\s+(0x\w+)\s+(0x\w+) (0x\w+) \w+\s+rescanned", 60, lambda: machine.running
        )
        machine.console.write("reboot -f\n")
        machine.wait(60)
    assert match.group(1, 2) == ("0x6b76", "0x0001")
    assert int(match.group(3), 16) == device.bar_address(0)
    assert int(match.group(4), 16) == device.bar_address(0) + 0x1F
