"""Boots the test box for real (QEMU TCG, a few seconds per test): proves what the box offers.

The box runs the same default-guest kernel as L1; these tests check that a command's output
and exit status come back, that L1's /dev/kvm is a working KVM, and that a guest with full user
space (the default guest, under QEMU with -accel kvm inside L1) runs a command there.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kvmlet.guest import QuietProgress, ensure_default_guest, parse_exit_status, run_parameter

RUN_SCRIPT = Path(__file__).resolve().parents[2] / "testbox" / "run.py"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        shutil.which("qemu-system-x86_64") is None, reason="qemu-system-x86 is not installed"
    ),
    pytest.mark.skipif(os.environ.get("KVMLET_TESTBOX") == "1", reason="already in the box"),
]

KVM_PROBE = """
import fcntl, os
kvm = os.open("/dev/kvm", os.O_RDWR)
print("api", fcntl.ioctl(kvm, 0xAE00))  # KVM_GET_API_VERSION
vm = fcntl.ioctl(kvm, 0xAE01, 0)  # KVM_CREATE_VM
print("vm", vm > 0)
print("npt", open("/sys/module/kvm_amd/parameters/npt").read().strip())
"""


def run_in_box(*command: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(RUN_SCRIPT), "--timeout", str(timeout), "--", *command],
        capture_output=True,
        timeout=timeout + 60,
        check=False,
    )


def test_output_and_exit_status_come_back():
    result = run_in_box("sh", "-c", "echo out; echo err >&2; exit 7")
    assert result.returncode == 7
    assert result.stdout == b"out\nerr\n"


def test_dev_kvm_in_l1_is_a_working_kvm_with_nested_paging():
    result = run_in_box("python3", "-c", KVM_PROBE)
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    assert result.stdout.decode().split("\n") == ["api 12", "vm True", "npt Y", ""]


def test_default_guest_user_space_runs_a_command_in_l2():
    guest = ensure_default_guest(progress=QuietProgress())
    parameters = f"console=ttyS0 quiet panic=-1 {run_parameter('echo hello from L2; exit 3')}"
    qemu = [
        *("qemu-system-x86_64", "-accel", "kvm", "-cpu", "host", "-m", "256M", "-smp", "1"),
        *("-nodefaults", "-no-user-config", "-display", "none", "-no-reboot"),
        *("-serial", "stdio", "-monitor", "none"),
        *("-kernel", str(guest.vmlinux), "-initrd", str(guest.initrd), "-append", parameters),
    ]
    result = run_in_box(*qemu)
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    assert b"kvmlet-guest: ready\r\nhello from L2\r\n" in result.stdout  # L2's tty adds \r
    assert parse_exit_status(result.stdout) == 3


def test_timeout_stops_the_box():
    result = run_in_box("sleep", "600", timeout=8)
    assert result.returncode == 124
    assert b"timed out" in result.stderr
