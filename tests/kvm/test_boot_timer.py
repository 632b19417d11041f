"""The boot-time marker port through the whole Machine."""

import pytest

from kvmlet.machine.config import MachineConfig
from kvmlet.machine.machine import Machine
from kvmlet.vstate.vcpu_loop import StopReason
from tests.kvm.test_machine_tiny_guests import I8042_RESET

pytestmark = pytest.mark.kvm


def mark_with(value: int) -> bytes:
    return bytes([0xB0, value]) + bytes.fromhex("ba4004 ee")  # mov al, V ; mov dx, 0x440 ; out


def run_code(code: bytes, boot_timer: bool = True) -> Machine:
    config = MachineConfig(boot_code=code, rng=False, host_profile="none", boot_timer=boot_timer)
    with Machine(config) as machine:
        assert machine.wait(10.0).reason is StopReason.RESET
    return machine


def test_the_magic_value_marks_the_boot_once_with_the_time_since_process_start(capfd):
    machine = run_code(mark_with(7) + mark_with(123) + mark_with(123) + I8042_RESET)
    assert 0 < machine.boot_marked_after < 3600
    lines = [line for line in capfd.readouterr().err.splitlines() if "boot timer" in line]
    assert len(lines) == 2 and lines[0].startswith("kvmlet: boot timer: ")


def test_without_the_option_the_port_is_unassigned():
    machine = run_code(mark_with(123) + I8042_RESET, boot_timer=False)
    assert machine.boot_marked_after is None
    assert machine.stats()["port_io"]["unassigned_writes"] == {0x440: 1}
