"""virtio-blk, virtio-rng and virtio-console as the default guest's user space sees them, on
both transports."""

from __future__ import annotations

import hashlib
import os
from dataclasses import replace
from pathlib import Path

import pytest

from kvmlet.guest import READY_MARKER
from kvmlet.machine.config import DiskConfig
from kvmlet.machine.machine import Machine
from kvmlet.sandbox import sandbox
from tests.helpers.guests import BOOT_TIMEOUT

pytestmark = pytest.mark.linux

TRANSPORTS = ["pci", "mmio"]


@pytest.fixture(params=TRANSPORTS)
def config(request, guest_config):
    return replace(guest_config, virtio_transport=request.param)


def make_image(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def with_disks(config, *disks: DiskConfig):
    return replace(config, disks=disks)


def test_guest_probes_every_device(config, tmp_path):
    disk = make_image(tmp_path / "disk.img", bytes(1 << 20))
    result = sandbox(
        "cat /sys/bus/virtio/devices/*/device; cat /sys/block/vda/size",
        replace(with_disks(config, DiskConfig(disk)), console="serial"),
        timeout=BOOT_TIMEOUT,
    )
    lines = result.output.split()
    assert sorted(lines[:-1]) == ["0x0002", "0x0004"]  # block, entropy
    assert lines[-1] == str((1 << 20) // 512)


def test_guest_writes_a_pattern_the_host_reads_back(config, tmp_path):
    disk = make_image(tmp_path / "disk.img", bytes(1 << 20))
    command = "printf 'kvmlet-pattern' | dd of=/dev/vda bs=512 seek=3 conv=sync,fsync 2>/dev/null"
    result = sandbox(command, with_disks(config, DiskConfig(disk)), timeout=BOOT_TIMEOUT)
    assert result.status == 0
    image = disk.read_bytes()
    assert image[3 * 512 : 3 * 512 + 14] == b"kvmlet-pattern"
    assert image[: 3 * 512] == bytes(3 * 512)


def test_guest_reads_a_host_image(config, tmp_path):
    data = os.urandom(1 << 20)
    disk = make_image(tmp_path / "data.img", data)
    read_only = with_disks(config, DiskConfig(disk, read_only=True))
    result = sandbox("md5sum /dev/vda", read_only, timeout=BOOT_TIMEOUT)
    assert result.output.split()[0] == hashlib.md5(data).hexdigest()


def test_writing_a_read_only_disk_fails(config, tmp_path):
    disk = make_image(tmp_path / "ro.img", bytes(1 << 20))
    command = "dd if=/dev/zero of=/dev/vda bs=4096 count=1 oflag=direct 2>/dev/null; echo rc=$?"
    read_only = with_disks(config, DiskConfig(disk, read_only=True))
    result = sandbox(command, read_only, timeout=BOOT_TIMEOUT)
    assert result.output.strip() != "rc=0"
    assert disk.read_bytes() == bytes(1 << 20)


def test_guest_reads_the_hardware_rng(config):
    command = "head -c 4096 /dev/hwrng | od -An -tx1 | tr -d ' \\n' | wc -c"
    result = sandbox(command, config, timeout=BOOT_TIMEOUT)
    assert result.output.strip() == str(2 * 4096)


def test_doorbells_never_exit_to_python(config, tmp_path):
    disk = make_image(tmp_path / "disk.img", bytes(4 << 20))
    command = "dd if=/dev/vda of=/dev/null bs=64k iflag=direct 2>/dev/null; echo done"
    result = sandbox(command, with_disks(config, DiskConfig(disk)), timeout=BOOT_TIMEOUT)
    assert result.output.strip() == "done"
    blk = result.stats["virtio"]["virtio-blk0"]
    requests = sum(queue["requests"] for queue in blk["queues"])
    assert requests >= 64
    assert blk["notify_exits"] == 0
    assert result.stats["virtio"]["workers"]["virtio-blk0"]["notifications"] >= 1


def test_console_text_goes_both_ways_over_hvc0(config):
    with Machine(replace(config, console="virtio")) as machine:
        machine.console.wait_for(READY_MARKER, BOOT_TIMEOUT, lambda: machine.running)
        machine.console.write("tty; echo hvc-$((20 + 22))\n")
        machine.console.wait_for("hvc-42", 60, lambda: machine.running)
        assert "/dev/hvc0" in machine.console.text()
        machine.console.write("reboot -f\n")
        machine.wait(60)
