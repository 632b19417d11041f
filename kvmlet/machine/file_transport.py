"""How a host directory reaches a guest that boots from it (`kvmlet run --rootfs`, `kvmlet
sandbox`): virtiofs where a virtiofsd can serve it for this user, else kvmlet's own 9p server.

- `virtiofs`: a virtio-fs device served by a virtiofsd kvmlet starts (kvmlet.host.virtiofsd);
  guest RAM goes in memfds the daemon maps. Faster, but the daemon must be installed and able
  to make its sandbox's namespaces (as root, or in a user namespace of the user's own).
- `9p`: a virtio-9p device served by kvmlet.ninep in the monitor: needs nothing on the host.

`choose_file_transport("auto")` takes virtiofs when `virtiofsd_problem()` finds none (for root
only for now: UNPRIVILEGED_VIRTIOFS), else 9p with the reason; `"9p"` and `"virtiofs"` force
one (a virtiofs that cannot run is one line).

A virtiofsd kvmlet runs as a normal user serves from a user namespace where that user is root:
the guest sees the user's files as root's (and the host's other users as nobody), and what
guest root creates belongs to the user on the host. Requests from any other guest user fail
there (their ids have no mapping), so a sandbox over it runs the command as guest root
(`command_runs_as_root`); over 9p, and for root, it runs as the caller's own uid and gid.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Literal, NamedTuple

from kvmlet.errors import KvmletError

if TYPE_CHECKING:
    from kvmlet.machine.config import FilePath, MachineConfig

TransportKind = Literal["9p", "virtiofs"]
UNPRIVILEGED_VIRTIOFS = (
    "which for a user who is not root does not run the guest's programs yet "
    "(exec of /bin/sh fails with EPERM; --rootfs-via virtiofs tries it)"
)
"""Seen in the test box as nobody: the daemon serves the host's / from its user namespace and
the guest mounts it, but executing a program from it fails. Until that is understood, auto
takes 9p for a normal user."""
ROOTFS_VIA = ("auto", "9p", "virtiofs")


class FileTransport(NamedTuple):
    """The way chosen (`kind`) and why (`reason`), for the one line `--verbose` prints."""

    kind: TransportKind
    reason: str

    def summary(self) -> str:
        return f"host directories over {self.kind}: {self.reason}"


def virtiofs_problem(program: FilePath | None, read_only: Sequence[FilePath] = ()) -> str | None:
    from kvmlet.host.virtiofsd import virtiofsd_problem

    program = None if program is None else os.fspath(program)
    return virtiofsd_problem(program, read_only=[os.fspath(path) for path in read_only])


def choose_file_transport(
    via: str,
    program: FilePath | None = None,
    problem: Callable[[FilePath | None, Sequence[FilePath]], str | None] | None = None,
    read_only: Sequence[FilePath] = (),
    euid: int | None = None,
) -> FileTransport:
    """The transport for `--rootfs-via VIA`: auto, 9p or virtiofs. `program` is the virtiofsd
    to run (None: Debian's), `read_only` the directories it would share read-only;
    `problem(program, read_only)` says why it cannot serve them here, None if it can
    (default: `virtiofs_problem`, which asks the host). Auto takes virtiofs for root only
    (`euid`, default this process's): see UNPRIVILEGED_VIRTIOFS."""
    if via not in ROOTFS_VIA:
        raise KvmletError(f"--rootfs-via {via!r}: use auto, 9p or virtiofs")
    if via == "9p":
        return FileTransport("9p", "asked for with --rootfs-via 9p")
    why_not = (problem or virtiofs_problem)(program, read_only)
    if via == "virtiofs":
        if why_not is not None:
            raise KvmletError(f"--rootfs-via virtiofs: {why_not}")
        return FileTransport("virtiofs", "asked for with --rootfs-via virtiofs")
    if why_not is None and (os.geteuid() if euid is None else euid) != 0:
        return FileTransport("9p", f"not virtiofs, {UNPRIVILEGED_VIRTIOFS}")
    if why_not is None:
        return FileTransport("virtiofs", "a virtiofsd can serve them for this user")
    return FileTransport("9p", f"not virtiofs, {why_not}")


def command_runs_as_root(kind: TransportKind, euid: int | None = None) -> bool:
    """Whether a sandbox command must run as guest root to own what it writes (a virtiofsd in
    a user namespace maps only the caller, as root): see the module's docstring."""
    return kind == "virtiofs" and (os.geteuid() if euid is None else euid) != 0


def with_host_directories(
    config: MachineConfig, kind: TransportKind, directories: Iterable[tuple[str, FilePath, bool]]
) -> MachineConfig:
    """`config` with host directories (tag, path, read-only) shared over `kind`, first."""
    from kvmlet.machine.config import ShareConfig

    directories = list(directories)
    if kind == "9p":
        shares = tuple(ShareConfig(path, tag, read_only) for tag, path, read_only in directories)
        return replace(config, shares=(*shares, *config.shares))
    from kvmlet.machine.vhost_config import FilesystemConfig

    filesystems = tuple(
        FilesystemConfig(tag, source=path, read_only=read_only)
        for tag, path, read_only in directories
    )
    return replace(config, filesystems=(*filesystems, *config.filesystems))


def root_parameters(kind: TransportKind, tag: str, read_only: bool = True) -> list[str]:
    """Kernel parameters naming share `tag` as the root, for kvmlet's root-file-system init
    (its kernel does not mount them: the initramfs's /init does)."""
    if kind == "virtiofs":
        return [f"root={tag}", "rootfstype=virtiofs", "ro" if read_only else "rw"]
    from kvmlet.machine import shares

    return shares.root_parameters(tag, read_only)


def root_filesystem(config: MachineConfig, tag: str) -> dict[str, object] | None:
    """The guest's root share of `config` (tag `tag`): its type, host directory and mode."""
    for share in config.shares:
        if share.tag == tag and share.path is not None:
            return {"type": "9p", "path": os.fspath(share.path), "read_only": share.read_only}
    for filesystem in config.filesystems:
        if filesystem.tag == tag and filesystem.source is not None:
            return {
                "type": "virtiofs",
                "path": os.fspath(filesystem.source),
                "read_only": filesystem.read_only,
            }
    return None
