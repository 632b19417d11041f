"""`kvmlet`: boot a kernel, run a command in a microVM, replay a recording, build the default
guest, and control running machines through their API sockets (list, stop, pause, resume,
stat, balloon).

Every user mistake ends as one line on stderr and a non-zero exit status; a traceback means a
bug in kvmlet.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import math
import os
import sys
import threading
import time
from typing import TYPE_CHECKING

from kvmlet import __version__
from kvmlet.cli.control import CONTROL_COMMANDS, add_control_commands
from kvmlet.cli.net import NETWORKS_HELP, add_net_option, net_configs
from kvmlet.cli.sandbox import (
    ROOTFS_HELP_EPILOG,
    add_sandbox_parser,
    add_share_arguments,
    command_sandbox,
    explain_rootfs_stop,
    with_shares,
)
from kvmlet.cli.vhost_options import add_vhost_arguments, vhost_fields
from kvmlet.errors import KvmletError

if TYPE_CHECKING:
    from kvmlet.machine.config import MachineConfig

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

REPLAY_EPILOG = """\
exit status: 0 when every replayed device answered as in the run, 2 at the first divergence
(printed), 1 when the file cannot be read or its devices rebuilt.
"""


class _Parser(argparse.ArgumentParser):
    """argparse with kvmlet's way of reporting mistakes: one line, exit status 1 (argparse
    prints its usage and exits 2)."""

    def error(self, message: str):  # type: ignore[override]
        command = self.prog.removeprefix("kvmlet").strip()
        hint = f"kvmlet {command} --help" if command else "kvmlet --help"
        raise KvmletError(f"{message} (see {hint})")


def _seconds(text: str) -> float:
    """A --timeout: a finite number of seconds above 0 that a wait can take."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value <= threading.TIMEOUT_MAX:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds above 0")
    return value


def _add_machine_arguments(parser: argparse.ArgumentParser) -> None:
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


def _help_width() -> int:
    """The width argparse would wrap help at: COLUMNS, else stdout's terminal, else 80 columns,
    less argparse's margin of 2 (what `shutil.get_terminal_size` answers argparse)."""
    try:
        columns = int(os.environ.get("COLUMNS", ""))
    except ValueError:
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns
        except (AttributeError, ValueError, OSError):
            columns = 0
    return (columns or 80) - 2


def build_parser() -> argparse.ArgumentParser:
    # argparse builds a help formatter for every add_argument; told the width, the formatter
    # does not import shutil (and bz2, lzma...) on each boot just to ask the terminal for it.
    width = _help_width()
    plain = functools.partial(argparse.HelpFormatter, width=width)
    raw_description = functools.partial(argparse.RawDescriptionHelpFormatter, width=width)
    parser = _Parser(
        prog="kvmlet",
        formatter_class=plain,
        description="A lightweight KVM virtual machine monitor: boots a Linux kernel directly, "
        "with a serial console, virtio disks, console and entropy.",
    )
    parser.add_argument("--version", action="version", version=f"kvmlet {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    run = commands.add_parser(
        "run",
        help="boot a kernel (default: kvmlet's own minimal guest)",
        description="Boot a Linux kernel with its console on this terminal.",
        epilog=RUN_EPILOG + NETWORKS_HELP + "\n" + ROOTFS_HELP_EPILOG,
        formatter_class=raw_description,
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
    _add_machine_arguments(run)
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

    add_sandbox_parser(commands, raw_description, _add_machine_arguments)

    replay = commands.add_parser(
        "replay",
        help="feed a --record file's accesses to fresh device models, report a divergence",
        description="Rebuild the recorded machine's devices without KVM, make each recorded "
        "access again and check that every device answers and acts as it did in the run.",
        epilog=REPLAY_EPILOG,
        formatter_class=raw_description,
    )
    replay.add_argument("file", metavar="FILE", help="a file written by kvmlet run --record")

    build = commands.add_parser(
        "build-guest",
        help="build (or find cached) the default guest kernel and initramfs",
        description="Build kvmlet's default guest from Debian's linux-source-6.1 (or --source) "
        "into kvmlet's cache: $KVMLET_CACHE_DIR, else $XDG_CACHE_HOME/kvmlet, else "
        "~/.cache/kvmlet. An unchanged configuration is found in the cache at once. The first "
        "build takes 7-8 minutes on 2 idle cores and keeps the extracted source (1.5 GB) "
        "and the build objects for faster rebuilds.",
        formatter_class=plain,
    )
    build.add_argument("--source", metavar="DIR", help="a Linux source tree to use")
    build.add_argument(
        "--install-source",
        action="store_true",
        help="apt-get install linux-source-6.1 and the build tools when missing (root only)",
    )
    build.add_argument(
        "--clean",
        action="store_true",
        help="remove what only a rebuild needs (the extracted source and the build objects) "
        "and cached guests of other configurations, keep the current default guest, and exit",
    )
    add_control_commands(commands, plain, raw_description)
    return parser


def _machine_config(args: argparse.Namespace, **extra):
    from kvmlet.boot.memory_map import parse_size
    from kvmlet.machine.config import MachineConfig
    from kvmlet.virtio.blk_config import parse_disk_option

    disks = []
    vhost_disks = []
    for text in args.disk:
        if text.startswith("vhost-user="):  # vhost_config.py loads only for one of those
            from kvmlet.machine.vhost_config import parse_vhost_user_disk

            vhost_disks.append(parse_vhost_user_disk(text))
        else:
            disks.append(parse_disk_option(text))
    if vhost_disks:
        extra["vhost_user_disks"] = tuple(vhost_disks)
    return MachineConfig(
        memory=parse_size(args.mem),
        cpus=args.cpus,
        disks=tuple(disks),
        virtio_transport=args.virtio_transport,
        host_profile=args.host_profile or "auto",
        **extra,
    )


def _port_number(text: str) -> int:
    try:
        return int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None


def _notice_profile(config) -> None:
    from kvmlet.vstate.host_profile import resolve

    profile = resolve(config.host_profile)
    if profile.notice:
        print(profile.notice, file=sys.stderr)


def _check_kvm_before_building() -> None:
    """Open /dev/kvm before minutes of building a default guest it could not run."""
    from kvmlet.kvm import Kvm

    kvm = Kvm()
    try:
        kvm.require()
    finally:
        kvm.close()


def run_config(args: argparse.Namespace) -> MachineConfig:
    """The `MachineConfig` of `kvmlet run ARGS`, the kernel checked and the host profile
    announced (the default guest is built or found only when no -k is given)."""
    from kvmlet.boot import inspect_kernel
    from kvmlet.machine.config import with_default_guest

    if args.initrd is not None and args.kernel is None:
        raise KvmletError("-i/--initrd needs -k/--kernel (the default guest has its own)")
    if args.kernel is not None:
        method = inspect_kernel(args.kernel).boot_method(args.boot_method)
        if args.module and method != "multiboot":
            raise KvmletError(f"--module is for multiboot kernels; {args.kernel} boots {method}")
    else:
        _check_kvm_before_building()
    extra = {}
    if args.module:
        from kvmlet.machine.config import parse_module_option

        extra["modules"] = tuple(parse_module_option(text) for text in args.module)
    if args.device:
        from kvmlet.machine.config import parse_device_option

        extra["devices"] = tuple(parse_device_option(text) for text in args.device)
    extra.update(net_configs(args))
    extra.update(vhost_fields(args))
    config = with_default_guest(
        _machine_config(
            args,
            kernel=args.kernel,
            initrd=args.initrd,
            params=args.params,
            console=args.console,
            boot_method=args.boot_method,
            debug_io=args.debug_io,
            balloon=args.balloon,
            debug_exit_port=args.debug_exit,
            record=args.record,
            name=args.name,
            **extra,
        )
    )
    config = with_shares(args, config)
    _notice_profile(config)
    return config


RESTORE_TAKES_FROM_FILE = {
    "kernel": (None, "-k/--kernel"),
    "initrd": (None, "-i/--initrd"),
    "params": ("", "-p/--params"),
    "module": ([], "--module"),
    "mem": ("256M", "-m/--mem"),
    "cpus": (1, "-c/--cpus"),
    "disk": ([], "-d/--disk"),
    "virtio_transport": ("pci", "--virtio-transport"),
    "console": ("serial", "--console"),
    "boot_method": ("auto", "--boot-method"),
    "debug_exit": (None, "--debug-exit"),
    "device": ([], "--device"),
    "record": (None, "--record"),
    "balloon": (False, "--balloon"),
}
"""The machine's own options, which --restore takes from the file: (default, option)."""


def _machine(args: argparse.Namespace, interactive: bool):
    """The machine `kvmlet run` runs: built from its options, or restored from --restore."""
    from kvmlet.machine.machine import Machine

    io = {"console_echo_fd": 1, "console_input_fd": 0, "escape": interactive}
    if args.restore is None:
        if args.force or args.verify:
            raise KvmletError("--force and --verify go with --restore FILE")
        return Machine(args.config, **io)
    changes = {"debug_io": args.debug_io}
    if args.host_profile is not None:
        changes["host_profile"] = args.host_profile
    return Machine.restore(args.restore, force=args.force, verify=args.verify, **io, **changes)


def _command_run(args: argparse.Namespace) -> int:
    from kvmlet.api.names import claim
    from kvmlet.host.report import format_stats
    from kvmlet.host.terminal import RawTerminal

    if args.restore is None:
        args.config = run_config(args)
    else:
        for name, (default, option) in RESTORE_TAKES_FROM_FILE.items():
            if getattr(args, name) != default:
                raise KvmletError(f"--restore takes the machine from its file: drop {option}")
    sigterm = _SigtermStops()
    # The name and socket, before any work; a SIGTERM meanwhile waits until the `try` below
    # can clean up after it.
    with sigterm.held():
        endpoint = claim(args.name, args.api_socket)
    try:
        sigterm.deliver()
        with RawTerminal(0) as terminal:  # raw mode only when stdin is a terminal
            interactive = terminal.is_tty
            # Held while the machine is built: raised from the handler there, the error could
            # land in code that takes any exception for a device's or KVM's refusal.
            with sigterm.held():
                machine = _machine(args, interactive)
            server = None
            try:
                sigterm.deliver()
                sigterm.machine = machine
                machine.start()
                from kvmlet.api.server import ApiServer  # after start: not before the guest runs

                server = ApiServer(machine, endpoint).start()
                stop = machine.wait(args.timeout)
            finally:
                if server is not None:
                    server.close()
                machine.close()
    finally:
        endpoint.close()
    elapsed = time.monotonic() - (machine.started or machine.created)
    newline = "\r\n" if interactive else ""  # the raw-mode console may end mid-line
    print(f"{newline}kvmlet: {stop} after {elapsed:.1f} s", file=sys.stderr)
    if args.rootfs is not None:
        explain_rootfs_stop(machine.console.transcript())
    if args.stats:
        sys.stderr.write(format_stats(machine.stats()))
    return stop.exit_status


class _SigtermStops:
    """SIGTERM (a service manager, an orchestrator) stops the guest like Ctrl-A x, so the
    monitor still closes its machine and removes its API socket; before the machine exists it
    ends `kvmlet run` with one line."""

    def __init__(self) -> None:
        import signal
        import threading

        self.machine = None
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._on_signal)

    @contextlib.contextmanager
    def held(self):
        """Block SIGTERM in the block; on failure it is let go at once, else by `deliver()`."""
        import signal

        self._previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
        try:
            yield
        except BaseException:
            self.deliver()
            raise

    def deliver(self) -> None:
        """Unblock SIGTERM: one that arrived while it was held runs its handler now."""
        import signal

        signal.pthread_sigmask(signal.SIG_SETMASK, self._previous)

    def _on_signal(self, signum: int, frame: object) -> None:
        from kvmlet.vstate.vcpu_loop import StopReason

        if self.machine is None:
            raise KvmletError("terminated (SIGTERM) before the guest started")
        self.machine.stop(StopReason.HOST_QUIT, "SIGTERM")


def _command_sandbox(args: argparse.Namespace) -> int:
    return command_sandbox(args, _machine_config, _check_kvm_before_building, _notice_profile)


def _command_replay(args: argparse.Namespace) -> int:
    from kvmlet.machine.replay import replay

    result = replay(args.file)
    print(f"kvmlet: {result.summary()}", file=sys.stderr)
    return 0 if result.divergence is None else 2


def _command_build_guest(args: argparse.Namespace) -> int:
    from pathlib import Path

    from kvmlet.guest import clean_cache, ensure_default_guest
    from kvmlet.guest.cache import format_bytes

    if args.clean:
        removed, kept = clean_cache()
        for path, size in removed:
            print(f"removed {path} ({format_bytes(size)})")
        for path in kept:
            print(f"kept    {path}")
        print(f"freed {format_bytes(sum(size for _, size in removed))}")
        return 0
    source = Path(args.source) if args.source is not None else None
    guest = ensure_default_guest(source, install_source=args.install_source)
    print(f"kernel (ELF):    {guest.vmlinux}")
    print(f"kernel (bzImage): {guest.bzimage}")
    print(f"initramfs:       {guest.initrd}")
    return 0


COMMANDS = {
    "run": _command_run,
    "sandbox": _command_sandbox,
    "replay": _command_replay,
    "build-guest": _command_build_guest,
    **CONTROL_COMMANDS,
}


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return COMMANDS[args.command](args)
    except KvmletError as error:
        print(f"kvmlet: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("kvmlet: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
