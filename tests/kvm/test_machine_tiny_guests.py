"""Tiny real-mode guests of our own through the whole Machine: run loop, bus and devices.

Each guest is a few bytes of 16-bit code (assembly in the comments) loaded at
BOOT_CODE_ADDRESS; it talks to kvmlet's devices and stops the machine through the i8042.
"""

import ctypes
import mmap
import time

import pytest

from kvmlet.bus import AccessSizes, IoRegion
from kvmlet.errors import GuestStoppedError
from kvmlet.machine.config import DiskConfig, MachineConfig
from kvmlet.machine.machine import Machine
from kvmlet.vstate.vcpu_loop import StopReason

pytestmark = pytest.mark.kvm

I8042_RESET = bytes.fromhex("b0fe e664")  # mov al, 0xfe ; out 0x64, al
ECHO_AL = bytes.fromhex("baf803 ee")  # mov dx, 0x3f8 ; out dx, al


def machine_for(code: bytes, **config) -> Machine:
    return Machine(MachineConfig(boot_code=code, rng=False, host_profile="none", **config))


def run_code(code: bytes, timeout: float = 10.0, **config):
    with machine_for(code, **config) as machine:
        stop = machine.wait(timeout)
    return machine, stop


def serial_print(text: bytes) -> bytes:
    code = bytes.fromhex("baf803")  # mov dx, 0x3f8
    for byte in text:
        code += bytes([0xB0, byte, 0xEE])  # mov al, BYTE ; out dx, al
    return code


def test_guest_writes_to_the_serial_console_and_resets_through_the_i8042():
    machine, stop = run_code(serial_print(b"hello\n") + I8042_RESET)
    assert stop.reason is StopReason.RESET
    assert machine.console.transcript() == b"hello\n"
    assert machine.stats()["port_io"]["regions"]["com1"]["writes"] == 6


def test_waiting_for_console_output_ends_with_the_stop_when_the_guest_stops():
    with machine_for(serial_print(b"bye\n") + I8042_RESET) as machine:
        started = time.monotonic()
        with pytest.raises(GuestStoppedError) as raised:
            machine.console.wait_for("never printed", timeout=30)
    assert time.monotonic() - started < 10
    assert raised.value.stop.reason is StopReason.RESET


def test_guest_reads_the_uart_line_status_through_the_bus():
    code = bytes.fromhex("bafd03 ec") + ECHO_AL + I8042_RESET  # mov dx, 0x3fd ; in al, dx
    machine, stop = run_code(code)
    assert stop.reason is StopReason.RESET
    (line_status,) = machine.console.transcript()
    assert line_status & 0x60 == 0x60  # THR empty and transmitter empty


def test_unassigned_port_reads_all_ones_and_is_counted():
    machine, stop = run_code(bytes.fromhex("e499") + ECHO_AL + I8042_RESET)  # in al, 0x99
    assert stop.reason is StopReason.RESET
    assert machine.console.transcript() == b"\xff"
    assert machine.stats()["port_io"]["unassigned_reads"] == {0x99: 1}


def test_cmos_rtc_answers_through_the_index_and_data_ports():
    code = bytes.fromhex("b00a e670 e471") + ECHO_AL + I8042_RESET  # out 0x70, 0x0a ; in 0x71
    machine, stop = run_code(code)
    assert stop.reason is StopReason.RESET
    (register_a,) = machine.console.transcript()
    assert register_a & 0x7F == 0x26  # 32.768 kHz time base, 1024 Hz rate


class ScratchDevice:
    """Sixteen bytes of registers that remember writes (a device model for the test)."""

    def __init__(self):
        self.registers = bytearray(range(0x40, 0x50))
        self.writes = []

    def read(self, offset, size):
        return int.from_bytes(self.registers[offset : offset + size], "little")

    def write(self, offset, size, value):
        self.writes.append((offset, size, value))
        self.registers[offset : offset + size] = value.to_bytes(size, "little")


def test_mmio_device_over_ram_splits_the_memory_slot_and_gets_the_accesses():
    # mov ax, 0xd000 ; mov ds, ax ; mov word [0x4], 0x1234 ; mov al, [0x2] ; echo al
    code = bytes.fromhex("b800d0 8ed8 c7060400 3412 a00200") + ECHO_AL
    # then read back RAM just past the device: mov al, [0x1000] (0xd1000, still RAM: 0)
    code += bytes.fromhex("a00010") + ECHO_AL + I8042_RESET
    device = ScratchDevice()
    machine = machine_for(code)
    region = IoRegion("scratch", 0x1000, device, valid=AccessSizes(1, 4), impl=AccessSizes(1, 4))
    machine.mmio.root.add_subregion(0xD0000, region, priority=1)
    try:
        machine.start()
        stop = machine.wait(10)
    finally:
        machine.close()
    assert stop.reason is StopReason.RESET
    assert device.writes == [(4, 2, 0x1234)]
    assert machine.console.transcript() == bytes([0x42, 0x00])
    assert region.counters()["reads"] == 1


def test_stop_kicks_halted_vcpus_and_reports_a_timeout():
    with machine_for(bytes.fromhex("fa f4"), cpus=2) as machine:  # cli ; hlt
        stop = machine.wait(0.3)
    assert stop.reason is StopReason.TIMEOUT
    assert not any(thread.is_alive() for thread in machine.vcpu_threads.threads)


def test_debug_io_traces_each_access_by_region_name(capfd):
    code = bytes.fromhex("e499") + ECHO_AL + I8042_RESET  # in al, 0x99 ; echo ; reset
    _, stop = run_code(code, debug_io=True)
    assert stop.reason is StopReason.RESET
    trace = capfd.readouterr().err.splitlines()
    assert "[io] io     R 0x00000099/1 = 0xff unassigned" in trace
    assert "[io] io     W 0x000003f8/1 = 0xff com1" in trace
    assert "[io] io     W 0x00000064/1 = 0xfe i8042" in trace


def test_first_kvm_run_is_timed_after_start():
    machine, stop = run_code(I8042_RESET)
    assert stop.reason is StopReason.RESET
    assert machine.created <= machine.started <= machine.first_run_at


@pytest.mark.parametrize("transport", ["pci", "mmio"])
def test_virtio_devices_wire_their_doorbells_to_kvm(tmp_path, transport):
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(1 << 20))
    config = {"rng": True, "disks": (DiskConfig(disk),), "virtio_transport": transport}
    with Machine(MachineConfig(boot_code=I8042_RESET, host_profile="none", **config)) as machine:
        stop = machine.wait(10)
        doorbells = {n.region_name for n in machine.kvm_listener.ioeventfds}
    assert stop.reason is StopReason.RESET
    assert len(machine.kvm_listener.ioeventfds) == 2  # one queue each: blk, rng
    assert all(("virtio" in name) for name in doorbells)


def test_ctrl_a_escapes_from_the_terminal_reach_the_monitor(capfd):
    import os

    read_end, write_end = os.pipe()
    config = MachineConfig(boot_code=bytes.fromhex("fa f4"), rng=False, host_profile="none")
    machine = Machine(config, console_input_fd=read_end, escape=True)
    try:
        machine.start()
        os.write(write_end, b"\x01h\x01s\x01x")  # help, statistics, quit
        stop = machine.wait(10)
    finally:
        machine.close()
        os.close(write_end)
        os.close(read_end)
    assert stop.reason is StopReason.HOST_QUIT
    err = capfd.readouterr().err
    assert "Ctrl-A x" in err  # the help text
    assert '"port_io"' in err  # the statistics dump


@pytest.mark.parametrize("timeout", [float("inf"), float("nan"), 1e300, -1.0])
def test_waiting_a_time_no_clock_can_wait_is_a_clear_error(timeout):
    from kvmlet.errors import KvmletError

    with machine_for(I8042_RESET) as machine:
        with pytest.raises(KvmletError, match="cannot wait"):
            machine.wait(timeout)
        assert machine.wait(10).reason is StopReason.RESET


def rom_guest(backing, readonly=True):
    """A table guest that loads, stores and loads again at a RAM region at 0xE0000000."""
    from kvmlet.bus import RamRegion
    from tests.helpers.tiny_guest import Op, table_guest, write_ops

    machine = machine_for(table_guest())
    rom = RamRegion("rom", len(backing), backing, readonly=readonly)
    machine.mmio.root.add_subregion(ROM_ADDRESS, rom)
    ops = [Op.load(ROM_ADDRESS + 4, 4), Op.store(ROM_ADDRESS + 8, 4, 0xDEADBEEF)]
    ops.append(Op.load(ROM_ADDRESS + 8, 4))
    write_ops(machine.memory, ops)
    return machine, rom


ROM_ADDRESS = 0xE000_0000


def run_rom_guest(machine):
    from tests.helpers.tiny_guest import read_results

    try:
        machine.start()
        assert machine.wait(10).reason is StopReason.RESET
        return read_results(machine.memory, 3)
    finally:
        machine.close()


def page_of_bytes() -> mmap.mmap:
    page = mmap.mmap(-1, 4096)
    page[:] = bytes(range(256)) * 16
    return page


def test_a_read_only_ram_region_is_a_read_only_memory_slot():
    """Reads come from the slot (no exit), writes exit and are dropped: the read-only flag made
    it from the region through the flat view and the KVM listener into the memory slot."""
    backing = page_of_bytes()
    machine, rom = rom_guest(backing)
    assert run_rom_guest(machine) == [0x07060504, 0, 0x0B0A0908]
    assert backing[8:12] == bytes([8, 9, 10, 11])
    assert (rom.reads, rom.writes) == (0, 1), "reads from the slot, the write exited"


@pytest.mark.parametrize("readonly", [True, False])
def test_ram_kvm_refuses_to_map_is_served_by_the_bus(readonly):
    """KVM refuses a slot whose host memory is not page-aligned: the space counts the refusal
    and every access exits to the region instead, with the same result. (A bytearray alone
    may happen to start on a page, so the view is moved off one when it does.)"""
    buffer = bytearray(2 * 4096)
    address = ctypes.addressof((ctypes.c_char * len(buffer)).from_buffer(buffer))
    start = 8 if address % 4096 == 0 else 0
    backing = memoryview(buffer)[start : start + 4096]
    backing[:] = bytes(range(256)) * 16
    machine, rom = rom_guest(backing, readonly)
    written = 0x0B0A0908 if readonly else 0xDEADBEEF
    assert run_rom_guest(machine) == [0x07060504, 0, written]
    assert (rom.reads, rom.writes) == (2, 1)
    assert machine.mmio.stats()["listener_errors"] >= 1
