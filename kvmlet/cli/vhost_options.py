"""`kvmlet run`'s options for devices served outside Python: --fs, --virtiofsd, --vsock and
--mem-backend (`-d vhost-user=SOCKET` is a -d option, read with the disks)."""

from __future__ import annotations

import argparse


def _cid(text: str) -> int:
    try:
        return int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a context id") from None


def add_vhost_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--fs",
        action="append",
        default=[],
        metavar="HOSTDIR[,tag=TAG][,ro]",
        help="share a host directory with virtiofs: kvmlet runs a virtiofsd for it (the guest "
        "mounts it with `mount -t virtiofs TAG /mnt`; TAG defaults to fs0, fs1...); "
        "socket=PATH,tag=TAG uses a virtiofsd already listening there; repeatable",
    )
    parser.add_argument(
        "--virtiofsd",
        metavar="PATH",
        help="the virtiofsd to run for --fs (default: /usr/lib/qemu/virtiofsd, package "
        "qemu-system-common)",
    )
    parser.add_argument(
        "--vsock",
        type=_cid,
        metavar="CID",
        help="a virtio-vsock device at context id CID (3 or more), served by the kernel's "
        "vhost-vsock (/dev/vhost-vsock); the host reaches the guest with AF_VSOCK at CID",
    )
    parser.add_argument(
        "--mem-backend",
        choices=("anon", "memfd"),
        help="guest RAM in anonymous memory, or in memfds another process can map (default: "
        "memfd when a vhost-user device, --fs or -d vhost-user=, is configured, else anon)",
    )


def vhost_fields(args: argparse.Namespace) -> dict[str, object]:
    """The `MachineConfig` fields these options set (vhost_config.py loads only for --fs)."""
    fields: dict[str, object] = {}
    if args.fs:
        from kvmlet.machine.vhost_config import parse_fs_option

        fields["filesystems"] = tuple(
            parse_fs_option(text, index) for index, text in enumerate(args.fs)
        )
    if args.virtiofsd is not None:
        fields["virtiofsd"] = args.virtiofsd
    if args.vsock is not None:
        fields["vsock_cid"] = args.vsock
    if args.mem_backend is not None:
        fields["mem_backend"] = args.mem_backend
    return fields
