"""A tiny guest counting in a loop, snapshotted and restored in a new process (issue 16).

The guest keeps a 32-bit counter in RAM and prints each value on COM1 as eight hex digits and
a newline; the snapshot can fall anywhere, mid-line included. The restored guest, in a fresh
interpreter, must print the rest of that line and go on with the next number: the whole
output reads 1, 2, 3... without a gap or a repeat.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import pytest

from kvmlet.devices import Device, PciFunction, Register, RegisterBlock, RegisterDevice
from kvmlet.errors import KvmletError
from kvmlet.machine.config import DeviceConfig, DiskConfig, MachineConfig
from kvmlet.machine.machine import Machine
from kvmlet.snapshot.format import PREAMBLE_SIZE, SnapshotFile, SnapshotWriter
from kvmlet.vstate.vcpu_loop import StopReason

pytestmark = pytest.mark.kvm

COUNTER = bytes.fromhex(
    "baf803"  # mov dx, 0x3f8
    "668b1e0006"  # again: mov ebx, [0x600]
    "6643"  # inc ebx
    "66891e0006"  # mov [0x600], ebx
    "b90800"  # mov cx, 8
    "66c1c304"  # digit: rol ebx, 4
    "88d8"  # mov al, bl
    "240f"  # and al, 0x0f
    "0430"  # add al, '0'
    "3c39"  # cmp al, '9'
    "7602"  # jbe out
    "0407"  # add al, 'A' - '9' - 1
    "ee"  # out: out dx, al
    "e2ed"  # loop digit
    "b00a"  # mov al, '\n'
    "ee"  # out dx, al
    "ebd9"  # jmp again
)
RESTORE = """
import sys, time
from kvmlet.machine.machine import Machine
from kvmlet.snapshot.format import PREAMBLE_SIZE, SnapshotFile, SnapshotWriter
machine = Machine.restore(sys.argv[1], console_echo_fd=1)
machine.start()
while machine.console.transcript().count(b"\\n") < 200:
    time.sleep(0.01)
machine.stop()
machine.wait(10)
machine.close()
"""


def numbers(output: bytes) -> list[int]:
    return [int(line, 16) for line in output.split(b"\n")[:-1]]


def counting_machine(**config) -> Machine:
    return Machine(MachineConfig(boot_code=COUNTER, rng=False, host_profile="none", **config))


def wait_for_lines(machine: Machine, count: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while machine.console.transcript().count(b"\n") < count:
        assert time.monotonic() < deadline, "the guest did not count"
        time.sleep(0.005)


@pytest.mark.parametrize("then", ["stop", "resume"])
def test_a_counting_guest_goes_on_from_where_it_was_in_a_new_process(tmp_path, then):
    snapshot = tmp_path / "counter.snap"
    with counting_machine(memory=64 << 20, cpus=2) as machine:
        wait_for_lines(machine, 100)
        machine.pause()  # what it printed up to the snapshot (which then resumes or stops)
        saved = machine.console.transcript()
        result = machine.snapshot(str(snapshot), then=then)
        if then == "resume":  # the original goes on counting, past what was saved
            wait_for_lines(machine, saved.count(b"\n") + 50)
            assert machine.state == "running"
            machine.stop()
        assert machine.wait(10).reason is StopReason.HOST_QUIT
    assert result.state == ("stopped" if then == "stop" else "running")
    assert result.ram_bytes <= 16 * 4096  # the code, the counter, the stack: zero pages stay out
    restored = subprocess.run(
        [sys.executable, "-c", RESTORE, str(snapshot)],
        capture_output=True,
        timeout=120,
        check=True,
    ).stdout
    sequence = numbers(saved + restored)
    assert len(sequence) >= 300
    assert sequence == list(range(1, len(sequence) + 1))


def test_a_snapshot_leaves_a_paused_machine_paused_and_refuses_a_stopped_one(tmp_path):
    with counting_machine() as machine:
        wait_for_lines(machine, 10)
        machine.pause()
        printed = machine.console.transcript()
        result = machine.snapshot(str(tmp_path / "a.snap"), then="pause")
        assert result.state == "paused" and machine.state == "paused"
        assert machine.console.transcript() == printed
        machine.resume()
        wait_for_lines(machine, printed.count(b"\n") + 10)
        machine.stop()
        machine.wait(10)
        with pytest.raises(KvmletError, match="cannot pause: the machine is stopped"):
            machine.snapshot(str(tmp_path / "b.snap"))
    assert not (tmp_path / "b.snap").exists()


def test_restoring_twice_from_one_file_gives_two_machines_that_count_alike(tmp_path):
    snapshot = tmp_path / "counter.snap"
    with counting_machine() as machine:
        wait_for_lines(machine, 20)
        machine.snapshot(str(snapshot), then="stop")
        saved = machine.console.transcript()
    outputs = []
    for _ in range(2):
        with Machine.restore(str(snapshot)) as restored:
            wait_for_lines(restored, 30)
            restored.stop()
            restored.wait(10)
        outputs.append(restored.console.transcript()[:200])
    assert outputs[0] == outputs[1]
    assert numbers(saved + outputs[0].rpartition(b"\n")[0] + b"\n")[-1] > 20


def test_a_restored_machine_snapshotted_again_over_its_own_file_goes_on(tmp_path):
    """The second snapshot reads pages of the first file the guest never touched again, and
    replaces that file while the machine still maps it (a rename: the old file lives on)."""
    snapshot = str(tmp_path / "counter.snap")
    printed = b""
    with counting_machine() as machine:
        machine.memory.write(0x20_0000, b"left alone")  # no one reads it until the end
        wait_for_lines(machine, 20)
        machine.pause()
        printed += machine.console.transcript()
        machine.snapshot(snapshot, then="stop")
    for _ in range(2):
        with Machine.restore(snapshot) as restored:
            wait_for_lines(restored, 20)
            restored.pause()
            printed += restored.console.transcript()
            restored.snapshot(snapshot, then="stop")
    with Machine.restore(snapshot) as restored:
        wait_for_lines(restored, 20)
        restored.stop()
        restored.wait(10)
        assert restored.memory.read(0x20_0000, 10) == b"left alone"
    sequence = numbers(printed + restored.console.transcript().rpartition(b"\n")[0] + b"\n")
    assert len(sequence) >= 80
    assert sequence == list(range(1, len(sequence) + 1))


class Scratch(RegisterDevice):
    """A user's port device: two registers."""

    def __init__(self, context):
        super().__init__(context, 8, [Register("value", 0), Register("status", 4, w1c=1)])


class ScratchPci(PciFunction):
    """A user's PCI function with one register BAR."""

    def __init__(self, context):
        super().__init__(context, vendor_id=0x1234, device_id=0x11, class_code=0xFF0000)
        self.block = RegisterBlock(16, [Register("data", 0)])
        self.add_register_bar(0, self.block)


class Stateless(Device):
    """A device model that keeps no record of itself: it cannot be snapshotted."""

    def __init__(self, context):
        super().__init__(context, 4)

    def read(self, offset, size):
        return 0

    def write(self, offset, size, value):
        pass


def test_the_users_devices_come_back_where_they_were_with_their_registers(tmp_path):
    snapshot = str(tmp_path / "devices.snap")
    port = DeviceConfig.port(Scratch, 0x510, name="scratch")
    with counting_machine(devices=(port,)) as machine:
        machine.add_device(DeviceConfig.pci(ScratchPci, name="scratchpci"))  # hot-added
        machine.devices["scratch"]["value"] = 0x1234_5678
        function = machine.devices["scratchpci"]
        function.block["data"] = 99
        function.program_bar(0, 0xD000_0000)  # as if the guest had moved it
        wait_for_lines(machine, 5)
        machine.snapshot(snapshot, then="stop")
    with Machine.restore(snapshot) as restored:
        wait_for_lines(restored, 5)
        assert restored.devices["scratch"]["value"] == 0x1234_5678
        assert restored.devices["scratchpci"].block["data"] == 99
        assert restored.devices["scratchpci"].bar_address(0) == 0xD000_0000
        assert restored.io.read(0x510, 4) == 0x1234_5678
        assert restored.mmio.read(0xD000_0000, 4) == 99
        restored.stop()


def test_a_device_without_save_state_refuses_the_snapshot_and_the_guest_goes_on(tmp_path):
    snapshot = tmp_path / "refused.snap"
    device = DeviceConfig.port(Stateless, 0x520, name="stateless")
    with counting_machine(devices=(device,)) as machine:
        wait_for_lines(machine, 5)
        with pytest.raises(KvmletError, match="device:stateless: device Stateless has no"):
            machine.snapshot(str(snapshot))
        assert machine.state == "running"
        before = machine.console.transcript().count(b"\n")
        wait_for_lines(machine, before + 5)
        machine.stop()
    assert not snapshot.exists() and os.listdir(tmp_path) == []


def rewrite_state(path: str, change) -> None:
    """Change a snapshot's state document and seal the file again (valid checksums): what a
    hand-made file, or one of a kvmlet with another idea of a device, would hold."""
    with SnapshotFile(path) as snapshot:
        state, size = snapshot.state, snapshot.ram_size
        ram_part = os.pread(snapshot.fd, size, PREAMBLE_SIZE)
    change(state)
    writer = SnapshotWriter(path, [size])
    os.pwrite(writer.fd, ram_part, PREAMBLE_SIZE)
    writer.finish(state)
    writer.commit()


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda state: state["ram"].pop("banks"), "its state does not fit this kvmlet"),
        (lambda state: state["vcpus"][0].pop("lapic"), "its state does not fit this kvmlet"),
        (lambda state: state["vcpus"][0].update(regs=b"short"), "registers of a vCPU is dam"),
        (lambda state: state["devices"]["com1"].pop("ier"), "com1: the snapshot's state does"),
        (lambda state: state["devices"].pop("i8042"), "no state for i8042"),
        (lambda state: state["machine"].update(cpus=0), "--cpus must be between"),
    ],
)
def test_a_state_that_does_not_fit_is_refused_in_one_line(tmp_path, change, message):
    snapshot = str(tmp_path / "a.snap")
    with counting_machine() as machine:
        wait_for_lines(machine, 2)
        machine.snapshot(snapshot, then="stop")
    rewrite_state(snapshot, change)
    with pytest.raises(KvmletError, match=re.escape(message)) as caught:
        Machine.restore(snapshot)
    assert "\n" not in str(caught.value)


def test_a_disk_changed_since_the_snapshot_is_refused_unless_forced(tmp_path):
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(1 << 20))
    snapshot = str(tmp_path / "disk.snap")
    with counting_machine(disks=(DiskConfig(image),)) as machine:
        wait_for_lines(machine, 2)
        machine.snapshot(snapshot, then="stop")
    with Machine.restore(snapshot) as same_disk:  # untouched: restored as it is
        same_disk.stop()
    with open(image, "r+b") as disk:
        disk.write(b"changed behind the snapshot's back")
    os.utime(image, ns=(0, 1))  # another modification time, whatever the clock's granularity
    with pytest.raises(KvmletError, match=r"disk .*disk.img changed since it was taken \(mtime"):
        Machine.restore(snapshot)
    result = subprocess.run(
        [sys.executable, "-m", "kvmlet", "run", "--restore", snapshot, "--timeout", "0.2"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1 and "--force restores anyway" in result.stderr
    forced = subprocess.run(
        [sys.executable, "-m", "kvmlet", "run", "--restore", snapshot, "--force", "--timeout", "1"],
        capture_output=True,
        timeout=60,
    )
    assert forced.returncode == 124  # it ran until the timeout
    assert len(numbers(forced.stdout.rpartition(b"\n")[0] + b"\n")) > 10
