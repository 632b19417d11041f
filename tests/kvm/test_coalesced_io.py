"""Coalesced port writes through the whole Machine: no exit for them, and the devices still see
every write, in order, before anything that could observe it."""

import pytest

from kvmlet.machine.config import MachineConfig
from kvmlet.machine.machine import Machine
from kvmlet.vstate.vcpu_loop import StopReason
from tests.kvm.test_machine_tiny_guests import ECHO_AL, I8042_RESET, serial_print

pytestmark = pytest.mark.kvm

ENABLE_THR_INTERRUPT = bytes.fromhex("baf903 b002 ee")  # mov dx, 0x3f9 ; mov al, 2 ; out dx, al
DISABLE_UART_INTERRUPTS = bytes.fromhex("baf903 b000 ee")


def run_code(code: bytes, **config):
    config = MachineConfig(boot_code=code, rng=False, host_profile="none", **config)
    with Machine(config) as machine:
        stop = machine.wait(10.0)
        exits = machine.exit_counts[0].snapshot()
    assert stop.reason is StopReason.RESET
    return machine, exits


def test_thr_writes_take_no_exit_and_reach_the_console_in_order():
    machine, exits = run_code(serial_print(b"hello\n") + I8042_RESET)
    if machine.coalesced is None:
        pytest.skip("this KVM has no coalesced port I/O")
    assert machine.console.transcript() == b"hello\n"
    assert exits["io"] == 1  # the i8042 reset alone
    assert machine.coalesced.drained == 6
    assert machine.stats()["port_io"]["regions"]["com1"]["writes"] == 6


def test_thr_writes_exit_while_a_thr_empty_interrupt_depends_on_them():
    code = ENABLE_THR_INTERRUPT + serial_print(b"ab") + DISABLE_UART_INTERRUPTS
    code += serial_print(b"cd") + I8042_RESET
    machine, exits = run_code(code)
    if machine.coalesced is None:
        pytest.skip("this KVM has no coalesced port I/O")
    assert machine.console.transcript() == b"abcd"
    assert exits["io"] == 5  # IER on, "a", "b", IER off, the reset: "c" and "d" were queued
    assert machine.coalesced.drained == 2


def test_a_queued_index_or_address_write_is_seen_by_the_next_read():
    rtc = bytes.fromhex("b00a e670 e471") + ECHO_AL  # out 0x70, 0x0a ; in al, 0x71
    # mov eax, 0x80000000 ; mov dx, 0xcf8 ; out dx, eax ; mov dl, 0xfc ; in al, dx (vendor, low)
    conf1 = bytes.fromhex("66b800000080 baf80c 66ef b2fc ec") + ECHO_AL
    machine, exits = run_code(rtc + conf1 + I8042_RESET)
    if machine.coalesced is None:
        pytest.skip("this KVM has no coalesced port I/O")
    register_a, vendor_low = machine.console.transcript()
    assert register_a & 0x7F == 0x26
    assert vendor_low == 0x86  # the host bridge, 8086:1237
    assert exits["io"] == 3  # the two reads and the reset; indexes and echoes were queued


def test_a_recording_machine_does_not_coalesce(tmp_path):
    machine, exits = run_code(serial_print(b"hi") + I8042_RESET, record=tmp_path / "run.rec")
    assert machine.coalesced is None
    assert exits["io"] == 3
    assert machine.console.transcript() == b"hi"
