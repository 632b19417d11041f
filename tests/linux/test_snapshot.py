"""Snapshot and restore of the booted default guest, across processes (issue 16).

A monitor boots the default guest with a virtio-blk disk; at its shell a loop counts, printing
each number on the console and appending it to a file on an ext2 file system on the disk (the
guest's page cache holds what `sync` has not written yet: it is in the snapshot's RAM). The
machine is snapshotted through the control API, left paused, and the monitor is SIGKILLed.
`kvmlet run --restore` in a new process then goes on: the console shows the sequence going on
without a gap or a repeat, the shell answers a new command, and the file on the disk holds
every number in order.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time

import pytest

import kvmlet
from kvmlet.guest import READY_MARKER
from tests.helpers.guests import BOOT_TIMEOUT

pytestmark = pytest.mark.linux

MONITOR = """
import sys
from pathlib import Path
import kvmlet
config = kvmlet.with_default_guest(kvmlet.MachineConfig(
    memory=256 << 20, disks=(kvmlet.DiskConfig(Path(sys.argv[1])),),
    virtio_transport=sys.argv[3]))
with kvmlet.Machine(config, console_echo_fd=1, console_input_fd=0) as machine:
    with kvmlet.serve(machine, sys.argv[2]):
        machine.wait(600)
"""
COUNTER = (
    "mke2fs -q /dev/vda && mount -t ext2 /dev/vda /mnt && "
    '(i=0; while :; do i=$((i+1)); echo "count $i"; echo $i >> /mnt/count.log; '
    "sleep 0.1; done) &\n"
)
COUNT = re.compile(r"count (\d+)\r?\n")
CHECK = (
    'kill %1; sync; awk \'NR != $1 {print "gap-at", NR; exit} END {print "lines-" NR}\' '
    "/mnt/count.log\n"
)


class ConsoleProcess:
    """A monitor process whose stdin is the guest's console input and stdout its output."""

    def __init__(self, argv: list[str]):
        self.process = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        self.output = b""
        self._changed = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        while chunk := os.read(self.process.stdout.fileno(), 65536):
            with self._changed:
                self.output += chunk
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def text(self) -> str:
        return self.output.decode(errors="replace").replace("\r", "")

    def wait_for(self, pattern: str, timeout: float) -> re.Match:
        deadline = time.monotonic() + timeout
        with self._changed:
            while (found := re.search(pattern, self.text())) is None:
                remaining = deadline - time.monotonic()
                assert remaining > 0, f"no {pattern!r} within {timeout} s: {self.text()[-2000:]}"
                assert self.process.poll() is None, f"the monitor ended: {self.text()[-2000:]}"
                self._changed.wait(min(remaining, 1.0))
        return found

    def write(self, text: str) -> None:
        self.process.stdin.write(text.encode())
        self.process.stdin.flush()

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        self.process.wait(BOOT_TIMEOUT)


def counts(text: str) -> list[int]:
    return [int(number) for number in COUNT.findall(text)]


@pytest.mark.parametrize("transport", ["pci", "mmio"])
def test_a_restored_guest_goes_on_counting_on_its_console_and_disk(
    tmp_path, monkeypatch, transport
):
    runtime = tempfile.mkdtemp(prefix="kvmlet-")  # short: a socket path has 108 bytes
    monkeypatch.setenv("XDG_RUNTIME_DIR", runtime)
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(16 << 20))
    snapshot = tmp_path / "guest.snap"
    first = ConsoleProcess([sys.executable, "-c", MONITOR, str(image), "counting", transport])
    try:
        first.wait_for(READY_MARKER, BOOT_TIMEOUT)
        first.write(COUNTER)
        first.wait_for(r"count 20\r?\n", BOOT_TIMEOUT)
        with kvmlet.connect("counting") as client:
            info = client.snapshot(str(snapshot), then="pause")
            assert info.state == "paused"
            before = client.console(1 << 20).text.replace("\r", "")
    finally:
        first.kill()  # the paused machine never runs again
    assert info.ram_bytes < 256 << 20 and snapshot.stat().st_blocks * 512 < 200 << 20
    saved = counts(before)
    assert saved[:20] == list(range(1, 21))

    second = ConsoleProcess([sys.executable, "-m", "kvmlet", "run", "--restore", str(snapshot)])
    try:
        last = saved[-1]
        second.wait_for(rf"count {last + 20}\r?\n", BOOT_TIMEOUT)
        second.write("echo answer-$((6 * 7))\n")
        second.wait_for(r"answer-42", BOOT_TIMEOUT)
        second.write(CHECK)
        lines = int(second.wait_for(r"lines-(\d+)\r?\n", BOOT_TIMEOUT)[1])
        assert re.search(r"gap-at \d", second.text()) is None, second.text()[-2000:]
    finally:
        second.kill()
    # The console: the restored guest's numbers follow the saved ones, none missing or twice
    # (a line cut by the snapshot is finished by the restored guest).
    sequence = counts(before + second.text())
    assert sequence == list(range(1, len(sequence) + 1)), sequence
    # The disk: every number printed was appended, in order (the loop prints, then appends).
    assert sequence[-1] - 1 <= lines <= sequence[-1] + 1, before + second.text()
