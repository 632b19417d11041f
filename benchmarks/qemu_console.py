"""QEMU as a guest benchmark's peer: its serial console on stdin/stdout, with a transcript.

Shared by the guest benchmarks that run the same guest command under QEMU and kvmlet
(virtio_blk_guest.py, net_guest.py), which wait for the guest's console prompts and answer
them with a line.
"""

from __future__ import annotations

import re
import subprocess
import threading
import time


class QemuConsole:
    """QEMU's serial console on its stdin and stdout (-nographic), with a transcript.

    `wait_for` gives up after `wait_timeout` seconds, `finish` waits `finish_timeout` for
    QEMU to end."""

    def __init__(self, argv: list[str], wait_timeout: float, finish_timeout: float):
        self.wait_timeout = wait_timeout
        self.finish_timeout = finish_timeout
        self.process = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.transcript = bytearray()
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while chunk := self.process.stdout.read1(65536):
            with self._changed:
                self.transcript += chunk
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def wait_for(self, pattern: str) -> None:
        regex = re.compile(pattern.encode())
        deadline = time.monotonic() + self.wait_timeout
        with self._changed:
            while not regex.search(self.transcript):
                if not self._reader.is_alive() or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"QEMU never printed {pattern!r}: {self.transcript[-2000:]!r}"
                    )
                self._changed.wait(1.0)

    def send_line(self) -> None:
        self.process.stdin.write(b"\n")
        self.process.stdin.flush()

    def finish(self) -> bytes:
        self.process.wait(self.finish_timeout)
        self._reader.join(self.finish_timeout)
        return bytes(self.transcript)
