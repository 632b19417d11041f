"""9p shares: host directories the guest mounts over virtio-9p (`--9p HOSTDIR[,tag=TAG][,ro]`).

Each share is a `kvmlet.ninep.Server` over its directory behind a `Virtio9p` device, on the
machine's virtio transport; the guest mounts it by tag:

    mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 TAG /mnt

or boots from it with `root_parameters(TAG)` (`root=TAG rootfstype=9p rootflags=...`).
512000 bytes is the largest msize Linux's virtio transport takes (125 pages of payload).

Every fid the guest holds costs the monitor up to `FDS_PER_FID` descriptors, and Linux's 9p
client keeps a fid per dentry it caches (with cache=loose, every file it has looked at), so
the fid limit is what bounds a guest's working set. Before the servers are built the soft
RLIMIT_NOFILE is raised to the hard one (and, for root, the hard one to fs.nr_open), and each
share gets an equal part of what the limit leaves.
"""

from __future__ import annotations

import os
from dataclasses import replace
from typing import TYPE_CHECKING

from kvmlet.errors import KvmletError
from kvmlet.machine.config import FilePath, MachineConfig, ShareConfig

if TYPE_CHECKING:
    from kvmlet.guest import Progress
    from kvmlet.machine.file_transport import TransportKind
    from kvmlet.memory import GuestMemory
    from kvmlet.virtio.p9 import Virtio9p

ROOT_TAG = "kvmletroot"
GUEST_MOUNT_OPTIONS = "trans=virtio,version=9p2000.L,msize=512000"
"""What the guest passes to `mount -t 9p` (add cache=loose for a read-only share)."""
FDS_PER_FID = 3
"""A fid's node, its directory's node, the file it opened."""
RESERVED_DESCRIPTORS = 512
"""Descriptors left to the rest of the monitor (KVM, eventfds, images, sockets)."""
MIN_FIDS = 256
MAX_FIDS = 1 << 20
NR_OPEN = "/proc/sys/fs/nr_open"


def parse_share_option(text: str, index: int = 0) -> ShareConfig:
    """`--9p HOSTDIR[,tag=TAG][,ro]`; the tag defaults to `share<index>`."""
    path, *words = text.split(",")
    if not path:
        raise KvmletError(f"--9p {text!r}: start with the host directory")
    tag = f"share{index}"
    read_only = False
    for word in words:
        key, has_value, value = word.partition("=")
        if key == "ro" and not has_value:
            read_only = True
        elif key == "tag" and value:
            tag = value
        else:
            raise KvmletError(f"--9p {text!r}: {word!r} is not tag=TAG or ro")
    return ShareConfig(path, tag, read_only)


def root_parameters(tag: str, read_only: bool = True) -> list[str]:
    """Kernel parameters that make the kernel mount share `tag` as its root (read-only ones
    with cache=loose: the guest may keep what it has looked up)."""
    cache = ",cache=loose" if read_only else ",cache=mmap"
    return [
        f"root={tag}",
        "rootfstype=9p",
        f"rootflags={GUEST_MOUNT_OPTIONS}{cache}",
        "ro" if read_only else "rw",
    ]


def parse_rootfs_option(text: str) -> tuple[str, bool]:
    """`--rootfs DIR[,rw]`: the directory and whether the guest writes through to it."""
    path, *words = text.split(",")
    if not path:
        raise KvmletError(f"--rootfs {text!r}: start with the host directory")
    if words not in ([], ["rw"]):
        raise KvmletError(f"--rootfs {text!r}: the only option is rw")
    return path, bool(words)


def with_root_share(
    config: MachineConfig,
    path: FilePath,
    writable: bool = False,
    progress: Progress | None = None,
    transport: TransportKind = "9p",
) -> MachineConfig:
    """`config` booting kvmlet's root-file-system initramfs (kvmlet.guest.rootfs) with host
    directory `path` as the guest's root, shared over `transport` (9p or virtiofs, see
    kvmlet.machine.file_transport): read-only under a tmpfs overlay, or `writable` (the
    guest's changes land in the directory). `config.initrd` must be unset."""
    from kvmlet.guest.rootfs import ensure_rootfs_initramfs
    from kvmlet.machine.file_transport import root_parameters, with_host_directories

    if config.initrd is not None:
        raise KvmletError("a host directory as root boots kvmlet's own initramfs: drop -i")
    if not os.path.isdir(path):
        raise KvmletError(f"--rootfs {os.fspath(path)}: not a directory")
    parameters = (
        *root_parameters(transport, ROOT_TAG, read_only=not writable),
        f"kvmlet.rootfs={'rw' if writable else 'overlay'}",
    )
    config = with_host_directories(config, transport, [(ROOT_TAG, path, not writable)])
    return replace(
        config,
        initrd=ensure_rootfs_initramfs(progress),
        extra_parameters=(*config.extra_parameters, *parameters),
    )


def raise_open_file_limit() -> int:
    """Raise this process's soft RLIMIT_NOFILE as far as it may go; returns the new soft limit.

    The soft limit goes to the hard one; a process with CAP_SYS_RESOURCE (root) raises the
    hard one to fs.nr_open first. Every descriptor kvmlet opens is O_CLOEXEC and none is
    watched with select(), so a high limit changes nothing else."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    ceiling = _nr_open()
    if hard == resource.RLIM_INFINITY or hard > ceiling:
        hard = ceiling
    if os.geteuid() == 0 and hard < ceiling:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (ceiling, ceiling))
            return ceiling
        except (OSError, ValueError):
            pass
    if soft == resource.RLIM_INFINITY or soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (OSError, ValueError):
            soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return soft


def _nr_open() -> int:
    try:
        with open(NR_OPEN) as file:
            return int(file.read())
    except (OSError, ValueError):
        return 1 << 20


def fids_per_share(open_file_limit: int, directory_shares: int) -> int:
    """Each directory share's fid limit: an equal part of the descriptors the monitor may
    open beyond its own, at FDS_PER_FID each."""
    if directory_shares <= 0:
        return MIN_FIDS
    spare = max(0, open_file_limit - RESERVED_DESCRIPTORS)
    return max(MIN_FIDS, min(MAX_FIDS, spare // (FDS_PER_FID * directory_shares)))


def share_devices(shares: tuple[ShareConfig, ...], memory: GuestMemory) -> list[Virtio9p]:
    """A virtio-9p device per share, its server built over its directory (KvmletError, one
    line, for a directory that cannot be shared); the caller closes them."""
    from kvmlet.ninep import Server
    from kvmlet.virtio.p9 import Virtio9p

    directories = sum(1 for share in shares if share.server is None)
    max_fids = fids_per_share(raise_open_file_limit(), directories) if directories else 0
    devices: list[Virtio9p] = []
    try:
        for share in shares:
            if share.server is not None:
                server = share.server
            elif share.path is None:
                raise KvmletError(f"9p share {share.tag!r}: give a directory or a server")
            else:
                server = Server(os.fspath(share.path), share.read_only, max_fids)
            try:
                devices.append(Virtio9p(memory, share.tag, server))
            except BaseException:
                server.close()
                raise
    except BaseException:
        for device in devices:
            device.close()
        raise
    return devices
