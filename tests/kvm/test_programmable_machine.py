"""The programmable machine with guests of our own: a PCI function hot-added while the guest
scans for it, watchpoints that break (every vCPU paused, control to the test) or fail, and
runs recorded and replayed against fresh device models."""

from __future__ import annotations

import hashlib
import json
import time

import pytest

from kvmlet import BREAK, DeviceConfig, Machine, MachineConfig
from kvmlet.devices.journal import MAGIC
from kvmlet.machine.replay import replay
from kvmlet.vstate.vcpu_loop import StopReason
from tests.helpers.multiboot_guest import CHECKOUT, DEBUG_EXIT_PORT, build_guest

pytestmark = pytest.mark.kvm

DIGEST = f"{CHECKOUT}/examples/pci_digest.py:PciDigest"
WATCHDOG = f"{CHECKOUT}/examples/watchdog.py:Watchdog"
MESSAGE = b"the quick brown fox"

PCI_GUEST = r"""
#include "guest.h"

static uint32_t config_read(uint32_t slot, uint32_t offset) {
    outl(0xCF8, 0x80000000u | slot << 11 | offset);
    return inl(0xCFC);
}

static char message[] = "the quick brown fox";
static uint8_t digest[32];

int guest_main(struct multiboot_info *info, const char *cmdline) {
    uint32_t slot = 32;
    for (uint32_t scan = 0; slot == 32 && scan < 2000000; scan++) {  /* until it is plugged */
        for (uint32_t candidate = 1; candidate < 32; candidate++) {
            if (config_read(candidate, 0) == 0x00016B76u) {
                slot = candidate;
                break;
            }
        }
    }
    if (slot == 32) {
        print("no device\n");
        return 3;
    }
    uint32_t bar = config_read(slot, 0x10) & ~0xFu;
    print("found 6b76:0001 at slot ");
    print_dec(slot);
    print(" bar0=");
    print_hex(bar);
    print(" command=");
    print_hex(config_read(slot, 0x04) & 0xFFFF);
    print("\n");
    mmio_write32(bar + 0x00, (uint32_t)message);
    mmio_write32(bar + 0x04, 0);
    mmio_write32(bar + 0x08, sizeof message - 1);
    mmio_write32(bar + 0x10, (uint32_t)digest);
    mmio_write32(bar + 0x14, 0);
    mmio_write32(bar + 0x0C, 1);
    while (!(mmio_read32(bar + 0x18) & 2)) {
    }
    mmio_write32(bar + 0x18, 2);
    print("digest ");
    for (int index = 0; index < 32; index++) {
        print_hex(digest[index]);
    }
    print("\n");
    return 0;
}
"""

COUNTER_GUEST = r"""
#include "guest.h"

int guest_main(struct multiboot_info *info, const char *cmdline) {
    for (uint32_t value = 1; value <= 10; value++) {
        outl(0x510, value);
    }
    return 9;
}
"""

WATCHDOG_GUEST = r"""
#include "guest.h"

int guest_main(struct multiboot_info *info, const char *cmdline) {
    outl(0x514, 30);  /* TIMEOUT_MS */
    outl(0x510, 1);   /* ENABLE: the countdown starts */
    outl(0x518, 0);   /* a kick */
    while (!(inw(0x51C) & 1)) {
    }
    print("expired ");
    print_dec(inw(0x51E));
    print("\n");
    outw(0x51C, 1);   /* clear EXPIRED */
    return inw(0x51C);
}
"""


@pytest.fixture(scope="module")
def guests(tmp_path_factory):
    directory = tmp_path_factory.mktemp("guests")
    sources = {"pci": PCI_GUEST, "counter": COUNTER_GUEST, "watchdog": WATCHDOG_GUEST}
    return {name: build_guest(directory, source, name=name) for name, source in sources.items()}


def config_for(kernel, **options) -> MachineConfig:
    return MachineConfig(kernel=kernel, debug_exit_port=DEBUG_EXIT_PORT, rng=False, **options)


def expected_digest() -> str:
    return "".join(f"0x{byte:08x}" for byte in hashlib.sha256(MESSAGE).digest())


def test_a_hot_added_pci_function_is_found_by_the_guests_scan_and_works(guests, tmp_path):
    record = tmp_path / "hotplug.rec"
    with Machine(config_for(guests["pci"], record=record)) as machine:
        time.sleep(0.3)  # the guest scans an empty bus meanwhile
        assert machine.console.text() == ""
        device = machine.add_device(DeviceConfig.pci(DIGEST))
        stop = machine.wait(60)
    console = machine.console.text()
    assert stop.exit_status == 1, console
    assert "found 6b76:0001 at slot 1 bar0=0xc0000000 command=0x00000002" in console
    assert f"digest {expected_digest()}" in console
    assert device.worker.completed == 1
    assert not device.intx_asserted  # raised when done, lowered by the W1C clear
    result = replay(record)  # the hot-add is in the recording, where it happened
    assert result.divergence is None, result.summary()
    assert result.accesses > 100


def test_a_watchpoint_breaks_pausing_every_vcpu_and_hands_control_to_the_caller(guests):
    seen = []
    machine = Machine(config_for(guests["counter"], cpus=2))  # watched before it starts
    try:
        machine.watch("io", 0x510, 0x511, lambda access: seen.append(access.value))
        breaker = machine.watch(
            "io", 0x510, 0x514, lambda access: BREAK if access.value == 5 else None
        )
        machine.start()
        access = machine.wait_for_break(timeout=60)
        assert (access.space, access.address, access.size, access.is_write) == (
            "io",
            0x510,
            4,
            True,
        )
        assert (access.value, access.vcpu, access.region) == (5, 0, None)
        assert machine.watchpoints.parked == {0, 1}  # the idle application processor too
        time.sleep(0.3)
        assert seen == [1, 2, 3, 4, 5]  # nothing ran while paused
        machine.unwatch(breaker)
        machine.resume()
        stop = machine.wait(60)
    finally:
        machine.close()
    assert stop.exit_status == (9 << 1) | 1
    assert seen == list(range(1, 11))


def test_a_failing_watch_stops_the_run_with_its_exception(guests):
    def never_seven(access):
        assert access.value != 7, "the guest wrote 7"

    machine = Machine(config_for(guests["counter"]))
    try:
        machine.watch("io", 0x510, 0x511, never_seven, reads=False)
        machine.start()
        stop = machine.wait(60)
    finally:
        machine.close()
    assert stop.reason is StopReason.WATCH_FAILED and stop.exit_status == 7
    assert "io write of 4 bytes at 0x510" in stop.detail and "the guest wrote 7" in stop.detail
    assert isinstance(machine.watch_error, AssertionError)


def test_a_recorded_watchdog_run_replays_and_a_changed_model_diverges(guests, tmp_path):
    record = tmp_path / "watchdog.rec"
    watchdog = DeviceConfig.port(WATCHDOG, 0x510, irq=11)
    with Machine(config_for(guests["watchdog"], devices=(watchdog,), record=record)) as machine:
        stop = machine.wait(60)
    assert stop.exit_status == 1, machine.console.text()
    assert "expired 1" in machine.console.text()
    result = replay(record)
    assert result.divergence is None, result.summary()

    broken = tmp_path / "broken.py"
    broken.write_text(
        (CHECKOUT / "examples" / "watchdog.py").read_text().replace('self["expiries"] += 1', "")
    )
    data = record.read_bytes()
    length = int.from_bytes(data[8:12], "little")
    header = json.loads(data[12 : 12 + length])
    header["devices"][0]["model"] = f"{broken}:Watchdog"
    encoded = json.dumps(header).encode()
    record.write_bytes(MAGIC + len(encoded).to_bytes(4, "little") + encoded + data[12 + length :])
    result = replay(record)
    assert "watchdog answered 0x0 in the replay, 0x1 in the run" in result.divergence
