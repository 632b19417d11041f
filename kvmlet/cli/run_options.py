"""The `kvmlet run` command's parser: its options, help and examples, and the machine's own
options (`add_machine_arguments`), which `kvmlet sandbox` takes too."""

from __future__ import annotations

import argparse
import math
import threading

from kvmlet.cli.net import NETWORKS_HELP, add_net_option
from kvmlet.cli.sandbox import ROOTFS_HELP_EPILOG, add_share_arguments
from kvmlet.cli.vhost_options import add_vhost_arguments

RUN_EPILOG = """\
examples:
  kvmlet run                          boot kvmlet's default guest to a busybox shell
  kvmlet run -k bzImage -p 'loglevel=7' -m 1G -c 2
  kvmlet run -k vmlinux -i initrd.gz -d disk.img -d ro.img,ro --console virtio
  kvmlet run --fs ~/src,tag=src --vsock 3 -d vhost-user=/run/qsd.sock   (mount -t virtiofs src /mnt)
  kvmlet run -k test.elf -p 'verbose' --module data.bin,name=data --debug-exit 0x501
  kvmlet run -k vmlinux --device examples/mailbox_device.py:Mailbox,mmio=0xf1000000,irq=10
  kvmlet run -k test.elf --debug-exit 0x501 --record run.rec; kvmlet replay run.rec
  kvmlet run --name web & kvmlet snapshot web web.snap --stop; kvmlet run --restore web.snap

console: Ctrl-A x quits, Ctrl-A s prints statistics, Ctrl-A h helps, Ctrl-A Ctrl-A sends Ctrl-A.

control: the machine answers its API on $XDG_RUNTIME_DIR/kvmlet/NAME.sock (else
~/.kvmlet/NAME.sock) while it runs: `kvmlet list`, `kvmlet stat NAME`, `kvmlet stop NAME`...

exit status: 0 when the guest reset or powered off (or you quit), 3 triple fault,
4 KVM could not run or emulate the guest, 5 guest crash, 6 this host cannot run the guest's
user space (host profile pvm), 7 a watchpoint's check failed, 8 a KVM system event kvmlet does
not know, 124 timeout, 1 a usage or setup error; a write of V to the --debug-exit port:
(V << 1) | 1 (its low 8 bits).
"""


def _seconds(text: str) -> float:
    """A --timeout: a finite number of seconds above 0 that a wait can take."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value <= threading.TIMEOUT_MAX:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds above 0")
    return value


def _port_number(text: str) -> int:
    try:
        return int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None


def add_machine_arguments(parser: argparse.ArgumentParser) -> None:
    """The machine's own options: RAM, vCPUs, disks, transport, host profile, timeout."""
    parser.add_argument(
        "-m",
        "--mem",
        default="256M",
        metavar="SIZE",
        help="guest RAM, e.g. 256M, 1G (default: %(default)s; plain numbers are MiB)",
    )
    parser.add_argument(
        "-c", "--cpus", type=int, default=1, metavar="N", help="vCPUs (default: %(default)s)"
    )
    parser.add_argument(
        "-d",
        "--disk",
        action="append",
        default=[],
        metavar="PATH[,ro][,direct]",
        help="a raw disk image as a virtio-blk device (/dev/vda, vdb...); repeatable; "
        "vhost-user=SOCKET[,ro] is a disk a vhost-user-blk backend serves (after the images)",
    )
    parser.add_argument(
        "--virtio-transport",
        choices=("pci", "mmio"),
        default="pci",
        help="how virtio devices appear to the guest (default: %(default)s)",
    )
    parser.add_argument(
        "--host-profile",
        choices=("auto", "none", "pvm"),
        default=None,
        help="workarounds for a host KVM: 'pvm' is the software KVM of some CI machines; "
        "auto detects it (default: auto; with --restore, the snapshot's)",
    )
    parser.add_argument(
        "--timeout",
        type=_seconds,
        default=None,
        metavar="SECONDS",
        help="stop the guest after this long (exit status 124)",
    )


def add_run_parser(commands, formatter_class) -> argparse.ArgumentParser:
    """Add `kvmlet run` to the `commands` subparsers; its help keeps the epilog's layout."""
    run = commands.add_parser(
        "run",
        help="boot a kernel (default: kvmlet's own minimal guest)",
        description="Boot a Linux kernel with its console on this terminal.",
        epilog=RUN_EPILOG + NETWORKS_HELP + "\n" + ROOTFS_HELP_EPILOG,
        formatter_class=formatter_class,
    )
    run.add_argument(
        "-k",
        "--kernel",
        metavar="KERNEL",
        help="bzImage, uncompressed ELF vmlinux or a multiboot kernel (default: kvmlet's "
        "default guest, built and cached on first use)",
    )
    run.add_argument("-i", "--initrd", metavar="INITRD", help="initramfs/initrd image")
    run.add_argument(
        "-p",
        "--params",
        default="",
        metavar="PARAMS",
        help="kernel parameters added after kvmlet's own (console=ttyS0 reboot=k panic=-1 ...); "
        "a multiboot kernel's command line is its file name and PARAMS only",
    )
    run.add_argument(
        "--module",
        action="append",
        default=[],
        metavar="FILE[,ARGS]",
        help="a multiboot module, its string being FILE and ARGS; repeatable",
    )
    add_machine_arguments(run)
    run.add_argument(
        "--console",
        choices=("serial", "virtio"),
        default="serial",
        help="the guest console: ttyS0 (8250 UART) or hvc0 (virtio-console)",
    )
    run.add_argument(
        "--boot-method",
        choices=("auto", "linux64", "pvh", "multiboot"),
        default="auto",
        help="ELF kernels: 64-bit boot protocol entry (carries an RNG seed) or PVH; auto "
        "boots a kernel with a multiboot header as multiboot",
    )
    run.add_argument(
        "--debug-exit",
        type=_port_number,
        metavar="PORT",
        help="an isa-debug-exit port: the guest's write of V ends kvmlet with exit status "
        "(V << 1) | 1",
    )
    run.add_argument(
        "--device",
        action="append",
        default=[],
        metavar="MODEL,PLACE[,irq=N][,KEY=VALUE]",
        help="a device model of yours (module:Name or file.py:Name) at port=ADDR, mmio=ADDR "
        "or pci[=SLOT], with its options; repeatable (docs/devices.md)",
    )
    run.add_argument(
        "--record",
        metavar="FILE",
        help="write every port and MMIO access that reaches kvmlet, and what each device "
        "answered, to FILE (see kvmlet replay)",
    )
    run.add_argument(
        "--debug-io",
        action="store_true",
        help="trace every port I/O and MMIO access that reaches kvmlet, on stderr",
    )
    run.add_argument(
        "--stats", action="store_true", help="print I/O and device counters when the guest stops"
    )
    run.add_argument(
        "--name",
        metavar="NAME",
        help="the machine's name for `kvmlet list/stop/...` (default: vm-PID); unique among "
        "your running machines",
    )
    run.add_argument(
        "--api-socket",
        metavar="PATH",
        help="where the control API listens (default: $XDG_RUNTIME_DIR/kvmlet/NAME.sock, "
        "else ~/.kvmlet/NAME.sock)",
    )
    add_share_arguments(run)
    add_net_option(run)
    run.add_argument(
        "--balloon",
        action="store_true",
        help="add a virtio-balloon: `kvmlet balloon NAME SIZE` then takes memory back from "
        "the guest, and free memory it reports is released on the host",
    )
    add_vhost_arguments(run)
    run.add_argument(
        "--restore",
        metavar="FILE",
        help="start the machine a snapshot file holds (`kvmlet snapshot`) where it was saved; "
        "the machine comes from the file, so no -k, -m, -d... with it",
    )
    run.add_argument(
        "--force",
        action="store_true",
        help="with --restore: go on even though a disk changed since the snapshot",
    )
    run.add_argument(
        "--verify",
        action="store_true",
        help="with --restore: check every checksum of the snapshot's RAM first (reads it all)",
    )
    return run
