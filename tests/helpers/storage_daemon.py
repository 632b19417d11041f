"""qemu-storage-daemon exporting an image as a vhost-user-blk backend, for the tests that need
a real one (skip where it is not installed: `STORAGE_DAEMON` is None)."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

STORAGE_DAEMON = shutil.which("qemu-storage-daemon")
LISTEN_TIMEOUT = 30.0


def listening(path: Path) -> bool:
    """Whether a server accepts connections at `path` (the file appears before listen())."""
    with socket.socket(socket.AF_UNIX) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True


@contextlib.contextmanager
def storage_daemon(
    image: Path, socket_path: Path, writable: bool = True
) -> Iterator[subprocess.Popen]:
    """The daemon serving `image` at `socket_path` (listening when this yields its process),
    killed at the end whatever happened."""
    daemon = subprocess.Popen(
        [
            "qemu-storage-daemon",
            "--blockdev",
            f"driver=file,node-name=disk,filename={image}",
            "--export",
            f"type=vhost-user-blk,id=export,node-name=disk,writable={'on' if writable else 'off'},"
            f"addr.type=unix,addr.path={socket_path}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + LISTEN_TIMEOUT
        while not listening(socket_path):
            assert daemon.poll() is None, f"qemu-storage-daemon exited ({daemon.returncode})"
            assert time.monotonic() < deadline, "qemu-storage-daemon did not listen"
            time.sleep(0.005)
        yield daemon
    finally:
        daemon.kill()
        daemon.wait()
