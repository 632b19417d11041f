"""A write the guest flushed is in the image even if the monitor dies at once (SIGKILL)."""

from __future__ import annotations

import os
import selectors
import signal
import subprocess
import sys
import time

import pytest

from tests.helpers.guests import BOOT_TIMEOUT

pytestmark = pytest.mark.linux

MONITOR = """
import sys
from pathlib import Path
from kvmlet.machine.config import with_default_guest
from kvmlet.guest import run_parameter
from kvmlet.machine.config import DiskConfig, MachineConfig
from kvmlet.machine.machine import Machine

image, transport, command = sys.argv[1:4]
config = with_default_guest(MachineConfig(
    disks=(DiskConfig(Path(image)),), virtio_transport=transport,
    extra_parameters=(run_parameter(command),),
))
with Machine(config, console_echo_fd=1) as machine:
    machine.wait(600)
"""

COMMAND = "printf flushed-data | dd of=/dev/vda bs=512 conv=sync,fsync 2>/dev/null; "
COMMAND += "echo FLUSH-DONE; sleep 5"  # then init resets the machine


@pytest.mark.parametrize("transport", ["pci", "mmio"])
def test_flushed_data_survives_sigkill_of_the_monitor(tmp_path, transport):
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(1 << 20))
    monitor = subprocess.Popen(
        [sys.executable, "-c", MONITOR, str(image), transport, COMMAND],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    seen = b""
    deadline = time.monotonic() + BOOT_TIMEOUT
    try:
        with selectors.DefaultSelector() as selector:
            selector.register(monitor.stdout, selectors.EVENT_READ)
            while b"FLUSH-DONE\n" not in seen.replace(b"\r", b""):
                remaining = deadline - time.monotonic()
                assert remaining > 0, f"no flush within the boot timeout: {seen[-2000:]!r}"
                if not selector.select(min(remaining, 1.0)):
                    continue
                chunk = os.read(monitor.stdout.fileno(), 4096)
                assert chunk, f"monitor ended before the flush: {seen[-2000:]!r}"
                seen += chunk
        # Frozen right after the guest saw its flush complete: the data is in the image
        # already, not in some buffer of the monitor's that an exit would write out.
        monitor.send_signal(signal.SIGSTOP)
        assert image.read_bytes()[:12] == b"flushed-data"
    finally:
        monitor.send_signal(signal.SIGKILL)
        monitor.wait(BOOT_TIMEOUT)
    assert image.read_bytes()[:12] == b"flushed-data"
