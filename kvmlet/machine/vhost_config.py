"""What a user asks of a machine's vhost devices: virtiofs shares, vhost-user disks, a vsock
CID, and the guest RAM backing they need; with the command line's spelling of each.

- `--fs HOSTDIR[,tag=TAG][,ro]`: a host directory the guest mounts with
  `mount -t virtiofs TAG DIR`, served by a virtiofsd kvmlet starts; `--fs socket=PATH,tag=TAG`
  connects to a virtiofsd already running there instead.
- `-d vhost-user=SOCKET[,ro]`: a disk served by a vhost-user-blk backend listening at SOCKET
  (qemu-storage-daemon, ...); `ro` shows it read-only to the guest.
- `--vsock CID`: a virtio-vsock device at context id CID, served by the kernel's vhost-vsock.
- `--mem-backend anon|memfd`: guest RAM in anonymous memory or in memfds another process can
  map; a vhost-user device needs the memfd, and gets it unless `anon` is asked for.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from kvmlet.errors import KvmletError

if TYPE_CHECKING:
    from kvmlet.machine.config import FilePath, MachineConfig

MemoryBackend = Literal["auto", "anon", "memfd"]
MEMORY_BACKENDS: tuple[MemoryBackend, ...] = ("auto", "anon", "memfd")
VIRTIOFS_TAG_BYTES = 36
"""The tag field of virtio-fs configuration space: UTF-8, NUL-padded, no terminator needed."""
VHOST_USER_PREFIX = "vhost-user="
FIRST_GUEST_CID = 3
"""0 and 1 are reserved, 2 is the host."""
LAST_GUEST_CID = 0xFFFF_FFFE
"""VMADDR_CID_ANY (2^32 - 1) is no guest's; vhost-vsock refuses wider CIDs."""


@dataclass(frozen=True)
class FilesystemConfig:
    """A virtiofs share: a host directory (`source`) kvmlet serves with a virtiofsd of its
    own, or the `socket` of a virtiofsd already running; `tag` is what the guest mounts."""

    tag: str
    source: FilePath | None = None
    read_only: bool = False
    socket: FilePath | None = None

    def check(self) -> None:
        if (self.source is None) == (self.socket is None):
            raise KvmletError(f"virtiofs share {self.tag!r}: give a host directory or a socket")
        encoded = self.tag.encode(errors="surrogateescape")
        if not encoded or len(encoded) > VIRTIOFS_TAG_BYTES or b"\0" in encoded:
            raise KvmletError(f"virtiofs tag {self.tag!r}: 1 to {VIRTIOFS_TAG_BYTES} bytes, no NUL")
        if self.socket is not None and self.read_only:
            raise KvmletError(
                f"virtiofs share {self.tag!r}: ro is for a directory kvmlet shares; "
                "a running virtiofsd decides that itself"
            )


@dataclass(frozen=True)
class VhostUserDiskConfig:
    """A disk served by a vhost-user-blk backend listening at `socket`."""

    socket: FilePath
    read_only: bool = False


def parse_fs_option(text: str, index: int) -> FilesystemConfig:
    """`HOSTDIR[,tag=TAG][,ro]` or `socket=PATH,tag=TAG`; the `index`-th share's tag
    defaults to fs<index>."""
    first, *words = text.split(",")
    source: str | None = None
    socket_path: str | None = None
    tag = f"fs{index}"
    read_only = False
    if first.startswith("socket="):
        socket_path = first.removeprefix("socket=")
    else:
        source = first
    for word in words:
        key, has_value, value = word.partition("=")
        if key == "tag" and has_value:
            tag = value
        elif word == "ro":
            read_only = True
        else:
            raise KvmletError(f"--fs {text!r}: unknown option {word!r} (tag=TAG, ro)")
    if not (source or socket_path):
        raise KvmletError(f"--fs {text!r}: name a host directory or socket=PATH")
    if socket_path is not None and not any(word.startswith("tag=") for word in words):
        raise KvmletError(f"--fs {text!r}: a running virtiofsd's share needs tag=TAG")
    config = FilesystemConfig(tag, source, read_only, socket_path)
    config.check()
    return config


def parse_vhost_user_disk(text: str) -> VhostUserDiskConfig:
    """`vhost-user=SOCKET[,ro]` (a `-d` option)."""
    path, *flags = text.removeprefix(VHOST_USER_PREFIX).split(",")
    if not path:
        raise KvmletError(f"disk option {text!r}: name the backend's socket")
    unknown = set(flags) - {"ro"}
    if unknown:
        raise KvmletError(f"disk option {text!r}: unknown flag {sorted(unknown)[0]!r}")
    return VhostUserDiskConfig(path, read_only="ro" in flags)


def uses_vhost_user(config: MachineConfig) -> bool:
    """Whether a device's backend maps guest RAM itself (virtiofs, vhost-user disks)."""
    return bool(config.filesystems or config.vhost_user_disks)


def shareable_memory(config: MachineConfig) -> bool:
    """Whether guest RAM goes in memfds: asked for, or needed by a vhost-user device."""
    if config.mem_backend == "auto":
        return uses_vhost_user(config)
    return config.mem_backend == "memfd"


def check_vhost_options(config: MachineConfig) -> None:
    """KvmletError (one line) for vhost options that cannot work together."""
    if config.mem_backend not in MEMORY_BACKENDS:
        raise KvmletError(f"unknown memory backend {config.mem_backend!r}: use anon or memfd")
    if config.mem_backend == "anon" and uses_vhost_user(config):
        raise KvmletError(
            "a vhost-user device (--fs, -d vhost-user=) maps guest RAM itself: "
            "use --mem-backend memfd (the default with one)"
        )
    tags = [share.tag for share in config.filesystems]
    for share in config.filesystems:
        share.check()
        if tags.count(share.tag) > 1:
            raise KvmletError(f"two virtiofs shares have the tag {share.tag!r}")
        if share.source is not None and not os.path.isdir(share.source):
            raise KvmletError(f"--fs {os.fspath(share.source)}: not a directory")
    cid = config.vsock_cid
    if cid is not None and not FIRST_GUEST_CID <= cid <= LAST_GUEST_CID:
        raise KvmletError(
            f"--vsock {cid}: a guest's CID is {FIRST_GUEST_CID} to {LAST_GUEST_CID} "
            "(0-2 are reserved, 2 is the host)"
        )
