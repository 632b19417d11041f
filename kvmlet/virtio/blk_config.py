"""What a virtio-blk disk is made of: `DiskConfig`, and the CLI's `-d PATH[,ro][,direct]`.

Kept apart from the device (`virtio/blk.py`) so that a machine configuration can name disks
without importing the block stack: a boot without disks never loads it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from kvmlet.errors import KvmletError

DISK_FLAGS = ("ro", "direct")


@dataclass(frozen=True)
class DiskConfig:
    """A raw disk image given to the guest as a virtio-blk device: its path (`str` or
    `os.PathLike`), read-only (the guest sees VIRTIO_BLK_F_RO) and `direct` (O_DIRECT I/O,
    past the host's page cache)."""

    path: str | os.PathLike
    read_only: bool = False
    direct: bool = False


def parse_disk_option(text: str) -> DiskConfig:
    """Parse `PATH[,ro][,direct]`; a malformed option is a KvmletError."""
    path, *flags = text.split(",")
    if not path:
        raise KvmletError(f"disk option {text!r}: missing image path")
    unknown = set(flags) - set(DISK_FLAGS)
    if unknown:
        raise KvmletError(f"disk option {text!r}: unknown flag {sorted(unknown)[0]!r}")
    return DiskConfig(path, read_only="ro" in flags, direct="direct" in flags)
