"""Booting the default guest to its busybox shell, and the serial console both ways."""

from __future__ import annotations

from dataclasses import replace

import pytest

from kvmlet.guest import READY_MARKER
from kvmlet.machine.machine import Machine
from kvmlet.sandboxing import run_in_guest
from kvmlet.vstate.vcpu_loop import StopReason
from tests.helpers.guests import BOOT_TIMEOUT

pytestmark = pytest.mark.linux


def test_elf_guest_reaches_its_shell_and_talks_over_the_serial_console(guest_config):
    with Machine(guest_config) as machine:
        machine.console.wait_for(READY_MARKER, BOOT_TIMEOUT, lambda: machine.running)
        machine.console.write('read line; echo "guest read <$line> $((6 * 7))"\n')
        machine.console.write("hello from the host\n")
        match = machine.console.wait_for(r"guest read <(.*)> 42", 60, lambda: machine.running)
        assert match.group(1) == "hello from the host"
        machine.console.write("reboot -f\n")
        stop = machine.wait(60)
    assert stop.reason is StopReason.RESET


def test_bzimage_guest_runs_a_command(bzimage_config):
    result = run_in_guest("echo bzimage-ok; exit 3", bzimage_config, timeout=BOOT_TIMEOUT)
    assert result.status == 3
    assert result.output == "bzimage-ok\n"


def test_two_vcpus_are_online_in_the_guest(guest_config):
    command = "grep -c ^processor /proc/cpuinfo"
    result = run_in_guest(command, replace(guest_config, cpus=2), timeout=BOOT_TIMEOUT)
    assert result.status == 0
    assert result.output.strip() == "2"


def test_guest_sees_the_memory_it_was_given(guest_config):
    config = replace(guest_config, memory=384 << 20)
    result = run_in_guest("grep MemTotal /proc/meminfo", config, timeout=BOOT_TIMEOUT)
    total_kib = int(result.output.split()[1])
    assert 300 * 1024 < total_kib <= 384 * 1024


def test_a_command_still_running_at_the_timeout_is_stopped_with_its_output(guest_config):
    result = run_in_guest("echo started; sleep 600", guest_config, timeout=40)
    assert result.status is None and result.stop.reason is StopReason.TIMEOUT
    assert result.output.startswith("started\n"), result.output
