"""A machine with virtiofs shares on a real VM (the guest halts at once): guest RAM in memfds,
a virtiofsd per share started with the machine and stopped with it, and a daemon killed while
the machine runs is one line, the machine going on."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time

import pytest

from kvmlet.errors import KvmletError
from kvmlet.host.virtiofsd import VIRTIOFSD_PATHS
from kvmlet.machine.config import MachineConfig
from kvmlet.machine.machine import Machine
from kvmlet.machine.vhost_config import FilesystemConfig

pytestmark = [
    pytest.mark.kvm,
    pytest.mark.skipif(
        not any(os.access(path, os.X_OK) for path in VIRTIOFSD_PATHS),
        reason="needs virtiofsd (apt-get install qemu-system-common)",
    ),
]

HALT = bytes.fromhex("fa f4")  # cli ; hlt


def running(pid: int) -> bool:
    status = subprocess.run(["ps", "-o", "stat=", "-p", str(pid)], capture_output=True, text=True)
    return status.stdout.strip() not in ("", "Z")


def test_shares_get_a_daemon_each_for_the_machines_life(tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    shares = (FilesystemConfig("rw", str(tmp_path)), FilesystemConfig("ro", "/", read_only=True))
    config = MachineConfig(boot_code=HALT, rng=False, host_profile="none", filesystems=shares)
    with Machine(config) as machine:
        assert all(bank.shareable for bank in machine.memory), "RAM a daemon can map"
        daemons = list(machine.virtio.vhost.daemons)
        assert [daemon.name for daemon in daemons] == ["virtiofsd for 'rw'", "virtiofsd for 'ro'"]
        os.killpg(daemons[1].pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while not machine.stats()["virtio"]["vhost-user-fs1"]["backend_error"]:
            assert time.monotonic() < deadline, "the dead daemon's device never noticed"
            time.sleep(0.01)
        assert machine.running
        fs0 = machine.stats()["virtio"]["vhost-user-fs0"]
        assert not fs0["needs_reset"] and fs0["backend_error"] is None
    assert not any(running(daemon.pid) for daemon in daemons), "stopped with the machine"
    assert not os.path.exists(daemons[0].runtime_directory or "/nonexistent")
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(lines) == 1 and "virtiofsd for 'ro'" in lines[0], lines
    assert "the device needs a reset, the guest keeps running" in lines[0]


def test_a_snapshot_of_a_machine_with_a_share_is_one_line_and_the_machine_goes_on(tmp_path):
    """virtiofsd keeps the guest's FUSE session (inodes, open files): nothing kvmlet could
    save, so the snapshot is refused, no file is left, and the machine runs on."""
    snapshot = tmp_path / "refused.snap"
    shares = (FilesystemConfig("rw", str(tmp_path)),)
    config = MachineConfig(boot_code=HALT, rng=False, host_profile="none", filesystems=shares)
    with Machine(config) as machine:
        with pytest.raises(KvmletError, match="lives outside kvmlet and cannot be saved") as e:
            machine.snapshot(str(snapshot))
        assert "\n" not in str(e.value)
        assert machine.state == "running"
        assert machine.stats()["virtio"]["vhost-user-fs0"]["backend_error"] is None
    assert os.listdir(tmp_path) == []
