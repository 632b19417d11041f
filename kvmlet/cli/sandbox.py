"""`kvmlet sandbox`, and the host-directory options of `kvmlet run` (`--9p`, `--rootfs`)."""

from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING

from kvmlet.errors import KvmletError

if TYPE_CHECKING:
    from kvmlet.machine.config import MachineConfig

SANDBOX_EPILOG = """\
examples:
  kvmlet sandbox -- uname -a
  kvmlet sandbox -- sh -c 'echo $((6*7)) > out.txt; exit 3'
  kvmlet sandbox -- make -C src
  git diff | kvmlet sandbox -m 1G -c 2 -- sh -c 'patch -p1 && make check'
  kvmlet sandbox --share ~/data -- ls ~/data
  kvmlet sandbox --net -- sh -c 'wget -qO- http://deb.debian.org/ | head'
  kvmlet sandbox --rootfs-via 9p --verbose -- id

The guest's root is this host's /, read-only under a throwaway overlay: the
command sees your files and programs, and what it writes outside the shared
directories is gone afterwards. The current directory (and each --share DIR)
is shared read-write at the same path; the command starts there, as your
uid and gid, with your environment (less what names this host session: SSH
agent, display, D-Bus, XDG_RUNTIME_DIR). Its stdout and stderr come here as
they are written; stdin is passed on when it is not a terminal (else the
command reads /dev/null). Ctrl-C sends the command SIGINT; a second one, or
5 s without an end, stops the guest.

One argument is a shell command line, run with `sh -c` (pipes, `;` and `$VAR`
work); several arguments are one program and its arguments, each passed on
exactly as given. The guest kernel is kvmlet's default guest; it needs 9p,
virtiofs for --rootfs-via virtiofs, overlayfs and devtmpfs (see kvmlet run
--help, "--rootfs").

how your files get there (--rootfs-via, --verbose says which and why):
  auto      virtiofs when a virtiofsd can run for you here (Debian's
            /usr/lib/qemu/virtiofsd, package qemu-system-common, and the
            namespaces of its sandbox), for root only for now, else 9p; the
            default
  virtiofs  the faster way; not as root, the daemon runs where only you are
            mapped, as root: the command then runs as the guest's root, which
            is you on the host (what it writes is yours; other users' files
            show as nobody's)
  9p        kvmlet's own 9p server: needs nothing, the command runs as you

network (--net [MODE], kvmlet run -n's modes): none by default; --net alone is
user mode (passt, apt-get install passt: DHCP, DNS and NAT to the host's
network; the gateway's address reaches the host's loopback).

exit status: the command's own. When the status is kvmlet's own, the last line
on stderr says why (`kvmlet: ...`): 1 a usage or setup error, or the command
reported no status; 124 the command was still running at --timeout; 130
interrupted (Ctrl-C) before the command reported a status; 6 this host cannot
run the guest's user space (host profile pvm); 3, 4, 5 the guest crashed, as
for `kvmlet run`.
"""

ROOTFS_HELP_EPILOG = """\
host directories:
  kvmlet run --9p ~/src,tag=src,ro    then in the guest:
                                      mount -t 9p -o trans=virtio,version=9p2000.L src /mnt
  kvmlet run -k arch/x86/boot/bzImage --rootfs /    your new kernel, your own user space
  kvmlet run --rootfs /srv/rootfs,rw  the guest's changes land in /srv/rootfs

--rootfs boots kvmlet's own initramfs (no -i): its init mounts DIR as the
root, read-only under a tmpfs overlay (,rw writes through to DIR), sets up
/proc /sys /dev /tmp /run, asks for an address with DHCP on every NIC (-n) and
starts a shell. DIR goes over virtiofs when a virtiofsd can run for you here,
else over kvmlet's own 9p server (--rootfs-via auto|9p|virtiofs forces one;
--verbose says which was taken and why; `kvmlet describe` shows it too). The
guest kernel needs, built in: CONFIG_VIRTIO_PCI (or CONFIG_VIRTIO_MMIO),
CONFIG_NET_9P, CONFIG_NET_9P_VIRTIO and CONFIG_9P_FS (9p), CONFIG_VIRTIO_FS
(virtiofs), CONFIG_OVERLAY_FS, CONFIG_DEVTMPFS, CONFIG_TMPFS,
CONFIG_BLK_DEV_INITRD, CONFIG_BINFMT_SCRIPT and a serial console; one that lacks
them stops with one line naming what is missing.
"""


def add_share_arguments(run: argparse.ArgumentParser) -> None:
    run.add_argument(
        "--9p",
        dest="ninep",
        action="append",
        default=[],
        metavar="HOSTDIR[,tag=TAG][,ro]",
        help="share a host directory over virtio-9p (tag default: share0, share1...); repeatable",
    )
    run.add_argument(
        "--rootfs",
        metavar="DIR[,rw]",
        help="boot with host directory DIR as the guest's root, read-only under a tmpfs "
        "overlay unless ,rw (see below)",
    )
    add_transport_arguments(run)


def add_transport_arguments(parser: argparse.ArgumentParser) -> None:
    """--rootfs-via and --verbose, for `kvmlet run --rootfs` and `kvmlet sandbox`."""
    from kvmlet.machine.file_transport import ROOTFS_VIA

    parser.add_argument(
        "--rootfs-via",
        choices=ROOTFS_VIA,
        default="auto",
        help="how the host's directories reach the guest: virtiofs (a virtiofsd kvmlet "
        "starts), 9p (kvmlet's own server) or auto: virtiofs when a virtiofsd can run for "
        "you here, else 9p (default: %(default)s)",
    )
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="say on stderr, in one line, which way the host's directories went and why",
    )


def _file_transport(args: argparse.Namespace, virtiofsd, read_only: list[str]):
    """The transport --rootfs-via asks for (`read_only`: the directories shared read-only),
    announced with --verbose."""
    from kvmlet.machine.file_transport import choose_file_transport

    transport = choose_file_transport(args.rootfs_via, virtiofsd, read_only=read_only)
    if args.verbose:
        print(f"kvmlet: {transport.summary()}", file=sys.stderr)
    return transport


def with_shares(args: argparse.Namespace, config: MachineConfig) -> MachineConfig:
    """`config` with the --9p shares and the --rootfs root of `kvmlet run ARGS`."""
    from dataclasses import replace

    from kvmlet.machine.shares import parse_rootfs_option, parse_share_option, with_root_share

    if args.ninep:
        shares = tuple(parse_share_option(text, index) for index, text in enumerate(args.ninep))
        config = replace(config, shares=(*config.shares, *shares))
    if args.rootfs is None:
        if args.rootfs_via != "auto":
            raise KvmletError("--rootfs-via is for --rootfs DIR")
        return config
    if args.initrd is not None:
        raise KvmletError("--rootfs boots kvmlet's own initramfs: drop -i/--initrd")
    path, writable = parse_rootfs_option(args.rootfs)
    kind = _file_transport(args, config.virtiofsd, [] if writable else [path]).kind
    return with_root_share(replace(config, initrd=None), path, writable, transport=kind)


def explain_rootfs_stop(console: bytes) -> None:
    """After a --rootfs run: one line saying why the guest stopped before its shell, when its
    console tells (a kernel option missing, the init's own complaint)."""
    from kvmlet.guest.rootfs import explain_boot_failure

    why = explain_boot_failure(console.decode(errors="replace"))
    if why is not None:
        print(f"kvmlet: {why}", file=sys.stderr)


def add_sandbox_parser(commands, formatter, add_machine_arguments) -> None:
    sandbox = commands.add_parser(
        "sandbox",
        help="run a command on your files in a throwaway microVM, with its output and status",
        description="Run COMMAND in a throwaway guest whose root is this host's, in the "
        "current directory, and exit with its status.",
        epilog=SANDBOX_EPILOG,
        formatter_class=formatter,
    )
    add_machine_arguments(sandbox)
    sandbox.add_argument(
        "--share",
        action="append",
        default=[],
        metavar="DIR",
        help="also share host directory DIR read-write at its own path; repeatable",
    )
    sandbox.add_argument(
        "-n",
        "--net",
        nargs="?",
        const="",
        metavar="MODE[,opt=value...]",
        help="give the guest a NIC on the network MODE: user (passt; also --net alone) or "
        "tap, with kvmlet run -n's options (default: no network)",
    )
    add_transport_arguments(sandbox)
    sandbox.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- COMMAND...")


def command_sandbox(args: argparse.Namespace, machine_config, check_kvm, notice_profile) -> int:
    import shlex

    from kvmlet import sandboxing as sandbox_module
    from kvmlet.errors import GuestStoppedError
    from kvmlet.vstate.vcpu_loop import StopReason

    argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    if not argv:
        raise KvmletError("no command given: kvmlet sandbox -- COMMAND...")
    command = argv[0] if len(argv) == 1 else shlex.join(argv)
    config = machine_config(args)
    transport = _file_transport(args, config.virtiofsd, ["/"])
    check_kvm()
    notice_profile(config)
    timeout = args.timeout or sandbox_module.DEFAULT_TIMEOUT
    sys.stdout.flush()
    try:
        result = sandbox_module.sandbox(
            command,
            config,
            timeout=timeout,
            shares=args.share,
            stdin=None if _is_terminal(0) else 0,
            stdout=1,
            stderr=2,
            rootfs_via=transport.kind,
            net=args.net,
        )
    except GuestStoppedError as error:  # the guest never ran the command
        print(f"kvmlet: {error}", file=sys.stderr)
        return error.stop.reason.exit_status or 1
    if result.status is not None:
        return result.status
    if result.interrupted:
        print("kvmlet: interrupted", file=sys.stderr)
        return 130
    if result.stop.reason is StopReason.TIMEOUT:
        print(f"kvmlet: the command timed out after {timeout:g} s", file=sys.stderr)
    else:
        print(f"kvmlet: the command reported no exit status ({result.stop})", file=sys.stderr)
    return result.stop.reason.exit_status or 1


def _is_terminal(fd: int) -> bool:
    try:
        return os.isatty(fd)
    except OSError:
        return False
