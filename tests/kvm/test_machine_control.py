"""Pause, resume, shutdown, describe and statistics of a Machine, with tiny guests of our own.

The guests are a few bytes of real-mode code (assembly in the comments) at BOOT_CODE_ADDRESS.
"""

from __future__ import annotations

import time

import pytest

from kvmlet.errors import KvmletError
from kvmlet.machine.config import MachineConfig
from kvmlet.machine.machine import Machine
from kvmlet.vstate.vcpu_loop import EXIT_REASONS, StopReason

pytestmark = pytest.mark.kvm

# mov dx, 0x3f8 ; L: out dx, al ; inc al ; jmp L  -- a byte on COM1 per exit, forever
COUNTER = bytes.fromhex("baf803 ee fec0 ebfb")
# L: in al, 0x64 ; test al, 1 ; jz L ; in al, 0x60 ; cmp al, 0x1d ; jne L  -- Ctrl pressed?
# mov al, 0xfe ; out 0x64, al ; hlt  -- then reset through the i8042
RESET_ON_CTRL = bytes.fromhex("e464 a801 74fa e460 3c1d 75f4 b0fe e664 f4")
HALT = bytes.fromhex("fa f4")  # cli ; hlt


def machine_for(code: bytes, **config) -> Machine:
    return Machine(MachineConfig(boot_code=code, rng=False, host_profile="none", **config))


def output_grows(machine: Machine, seconds: float = 0.3) -> bool:
    before = len(machine.console.transcript())
    time.sleep(seconds)
    return len(machine.console.transcript()) > before


def wait_for_output(machine: Machine, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not machine.console.transcript():
        assert time.monotonic() < deadline, "the guest printed nothing"
        time.sleep(0.01)


def test_pause_holds_the_guest_and_resume_lets_it_go_on():
    with machine_for(COUNTER) as machine:
        wait_for_output(machine)
        machine.pause()
        assert machine.state == "paused"
        exits = machine.stats()["vcpus"][0]["exits"]
        assert not output_grows(machine)
        assert machine.stats()["vcpus"][0]["exits"] == exits  # not one exit while paused
        assert exits["intr"] >= 1  # the pause interrupted KVM_RUN
        machine.pause()  # pausing twice is harmless
        machine.resume()
        assert machine.state == "running"
        assert output_grows(machine)
        machine.resume()  # so is resuming a running machine
        stop = machine.shutdown()
    assert stop.reason is StopReason.HOST_QUIT
    assert machine.state == "stopped"
    assert machine.paused_seconds >= 0.3


def test_pause_reaches_halted_and_not_yet_started_vcpus():
    with machine_for(HALT, cpus=3) as machine:  # vCPUs 1-2 wait for INIT forever
        time.sleep(0.2)
        machine.pause(timeout=5)
        assert len(machine.watchpoints.parked) == 3
        machine.resume()
        machine.pause(timeout=5)
        machine.resume()


def test_the_guest_clock_does_not_advance_while_paused():
    with machine_for(COUNTER) as machine:
        wait_for_output(machine)
        machine.pause()
        frozen = machine._frozen_clock.nanoseconds
        time.sleep(0.5)
        machine.resume()
        after = machine.vm.get_clock().clock
    assert 0 <= after - frozen < 0.25e9  # without the thaw it would be >= 0.5 s on


def test_a_stop_releases_a_paused_machine():
    machine = machine_for(COUNTER)
    try:
        machine.start()
        wait_for_output(machine)
        machine.pause()
        stop = machine.shutdown()  # no grace: from the host
        assert stop.reason is StopReason.HOST_QUIT
        assert machine.wait(5).reason is StopReason.HOST_QUIT
        assert not any(thread.is_alive() for thread in machine.vcpu_threads.threads)
    finally:
        machine.close()


def test_a_clean_shutdown_request_of_a_paused_machine_is_refused():
    with machine_for(COUNTER) as machine:
        machine.pause()
        with pytest.raises(KvmletError, match="paused: resume it first"):
            machine.shutdown(grace=1.0)
        assert machine.state == "paused"


def test_shutdown_asks_the_guest_first_through_the_keyboard_controller():
    with machine_for(RESET_ON_CTRL) as machine:
        started = time.monotonic()
        stop = machine.shutdown(grace=10.0)
        took = time.monotonic() - started
    assert stop.reason is StopReason.RESET  # the guest reset the machine itself
    assert took < 5.0


def test_shutdown_stops_a_guest_that_ignores_the_request_after_the_grace_period():
    with machine_for(HALT) as machine:
        started = time.monotonic()
        stop = machine.shutdown(grace=0.3)
        took = time.monotonic() - started
    assert stop.reason is StopReason.HOST_QUIT
    assert 0.3 <= took < 3.0


def test_pause_and_resume_need_a_running_machine():
    machine = machine_for(HALT)
    try:
        with pytest.raises(KvmletError, match="cannot pause: the machine is created"):
            machine.pause()
        machine.start()
        machine.shutdown()
        machine.wait(5)
        with pytest.raises(KvmletError, match="cannot resume: the machine is stopped"):
            machine.resume()
    finally:
        machine.close()


def test_exits_are_counted_per_vcpu_by_reason():
    # mov dx, 0x3fd ; mov cx, 300 ; L: in al, dx ; loop L ; then reset through the i8042
    # (reads of COM1's line status: THR writes would be coalesced, no exit)
    code = bytes.fromhex("bafd03 b92c01 ec e2fd b0fe e664")
    with machine_for(code, cpus=2) as machine:
        stop = machine.wait(10)
    assert stop.reason is StopReason.RESET
    first, second = (vcpu["exits"] for vcpu in machine.stats()["vcpus"])
    assert set(first) == set(EXIT_REASONS)
    assert first["io"] == 301  # 300 reads of COM1 and the reset
    assert first["mmio"] == 0
    assert second["io"] == 0


def test_describe_says_what_the_machine_is():
    with machine_for(HALT, memory=64 << 20, cpus=2) as machine:
        time.sleep(0.1)
        info = machine.describe()
    assert info["state"] == "running"
    assert (info["vcpus"], info["memory_bytes"]) == (2, 64 << 20)
    assert info["uptime_seconds"] >= 0.1
    assert {"com1", "i8042", "cmos-rtc"} <= {device["name"] for device in info["devices"]}
    assert info["versions"]["kvm_api"] == 12


def test_statistics_report_the_memory_of_the_monitor_and_of_guest_ram():
    with machine_for(bytes.fromhex("b0fe e664"), memory=64 << 20) as machine:  # reset
        assert machine.wait(10).reason is StopReason.RESET
        memory = machine.stats()["memory"]
    assert memory["guest_ram_rss_bytes"] >= 4096  # the page the boot code was loaded in
    assert memory["rss_bytes"] == memory["guest_ram_rss_bytes"] + memory["monitor_rss_bytes"]
    assert memory["monitor_rss_bytes"] > 1 << 20
