"""`kvmlet run`: its options made into a `MachineConfig` (or a snapshot file to restore), the
machine built, started and served on its API socket until the guest stops; SIGTERM stops it
the way Ctrl-A x does. `kvmlet sandbox` builds its configuration with the same helpers."""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from typing import TYPE_CHECKING

from kvmlet.cli.net import net_configs
from kvmlet.cli.sandbox import explain_rootfs_stop, with_shares
from kvmlet.cli.vhost_options import vhost_fields
from kvmlet.errors import KvmletError

if TYPE_CHECKING:
    from kvmlet.machine.config import MachineConfig


def machine_config(args: argparse.Namespace, **extra):
    """The `MachineConfig` of the machine's own options (-m, -c, -d...) and `extra` fields."""
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


def notice_profile(config) -> None:
    from kvmlet.vstate.host_profile import resolve

    profile = resolve(config.host_profile)
    if profile.notice:
        print(profile.notice, file=sys.stderr)


def check_kvm_before_building() -> None:
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
        check_kvm_before_building()
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
        machine_config(
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
    notice_profile(config)
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


def command_run(args: argparse.Namespace) -> int:
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
