"""Run one command in a throwaway microVM on the caller's own files; get its output and status.

`sandbox(command)` boots a guest whose root is the host's `/` (over virtiofs where a virtiofsd
can serve it for this user, else over kvmlet's own virtio-9p: kvmlet.machine.file_transport),
read-only under a tmpfs overlay (what the command writes there is gone afterwards), with the
current directory shared read-write at the same path and made the working directory. The
command runs with `sh -c` as the caller's uid and gid (as guest root over an unprivileged
virtiofsd, which maps the caller to it) with the caller's environment (kvmlet.sandboxing.control
says what stays out); its stdout and stderr come back as they are written, its exit status at
the end. `net="user"` gives the guest a network. The command protocol
(kvmlet.sandboxing.control) carries a per-run random token.

    result = kvmlet.sandbox("make -C src && ./src/hello; exit 3")
    result.status, result.stdout   # (3, b"...")

`run_in_guest(command)` is the smaller thing: the command runs as root in kvmlet's default
guest (its busybox initramfs, none of the host's files), its output read from the console.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace

from kvmlet.errors import GuestStoppedError
from kvmlet.guest.run_protocol import (
    command_output,
    command_started,
    parse_exit_status,
    run_parameter,
)
from kvmlet.machine.config import MachineConfig, ShareConfig, with_default_guest
from kvmlet.machine.machine import Machine
from kvmlet.sandboxing.control import ControlDirectory, check_directory, guest_environment
from kvmlet.vstate.vcpu_loop import GuestStop, StopReason

DEFAULT_TIMEOUT = 600.0
INTERRUPT_GRACE = 5.0
"""Seconds the command has to end after a first Ctrl-C (SIGINT) before the guest is stopped."""
CONTROL_TAG = "kvmletctl"
WORKDIR_TAG = "kvmletcwd"


@dataclass(frozen=True)
class SandboxResult:
    """What the command printed (`output`: stdout and stderr as text, in the order they
    arrived; `stdout` and `stderr` as bytes; empty for a stream the caller had passed on to
    a file descriptor), its exit status (None if it never reported
    one), how the guest stopped, and whether a KeyboardInterrupt stopped it."""

    status: int | None
    output: str
    stop: GuestStop
    stats: dict = field(default_factory=dict, repr=False)
    stdout: bytes = b""
    stderr: bytes = b""
    interrupted: bool = False
    transport: str = "9p"
    """How the host's directories reached the guest: 9p or virtiofs."""


def sandbox(
    command: str,
    config: MachineConfig | None = None,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    cwd: str | None = None,
    env: Mapping[str, str] | None = None,
    root: str = "/",
    shares: Iterable[str] = (),
    stdin: bytes | int | None = None,
    stdout: int | None = None,
    stderr: int | None = None,
    echo_fd: int | None = None,
    rootfs_via: str = "auto",
    net: str | None = None,
) -> SandboxResult:
    """Run `command` (a shell line) on the host's files in a throwaway guest.

    `config` sets memory, CPUs, disks...; its kernel defaults to kvmlet's default guest, and
    the guest boots kvmlet's root-file-system initramfs (any initrd of `config` is not used).
    `cwd` (default: the current directory) is shared read-write and is the command's working
    directory; `shares` are more host directories shared read-write at their own paths;
    `root` is the directory the guest sees as `/` (read-only, with an overlay). `env`
    (default: os.environ) is the command's environment. `stdin` is bytes, or a file
    descriptor whose data is passed on as it arrives, or None (/dev/null). `stdout` and
    `stderr` are file descriptors that get the command's output as it comes (what goes there
    is not kept in the result, so output of any size streams); `echo_fd` gets the guest's
    console.

    `rootfs_via` is how the root and the shared directories reach the guest: "virtiofs",
    "9p", or "auto" (virtiofs where a virtiofsd can run for this user, else 9p); with an
    unprivileged virtiofsd the command runs as guest root, which is the caller on the host
    (kvmlet.machine.file_transport). `net` gives the guest a NIC, e.g. "user" (passt: DHCP,
    DNS and NAT to the host's network, the host's loopback at the gateway's address) or ""
    for the default; the options are `kvmlet run -n`'s.

    A command still running after `timeout` seconds is stopped: the result then has status
    None and `stop.reason` TIMEOUT. A KeyboardInterrupt while waiting sends the command
    SIGINT and waits INTERRUPT_GRACE seconds more (a second one stops the guest at once);
    the result is then `interrupted`. Raises GuestStoppedError when the guest stopped before
    the command started (its message says why: this host's KVM cannot run guest user space,
    the kernel lacks an option, ...), KvmletError for a directory that cannot be shared.
    """
    from kvmlet.guest.rootfs import explain_boot_failure
    from kvmlet.machine.file_transport import (
        choose_file_transport,
        command_runs_as_root,
        with_host_directories,
    )
    from kvmlet.machine.shares import with_root_share

    workdir = check_directory(cwd if cwd is not None else os.getcwd(), "working directory")
    extra = [check_directory(path, "share") for path in shares]
    base = replace(with_default_guest(config), initrd=None)
    if net is not None:
        from kvmlet.virtio.net.option import parse_net_option

        base = replace(base, nets=(*base.nets, parse_net_option(net)))
    kind = choose_file_transport(rootfs_via, base.virtiofsd, read_only=[root]).kind
    as_root = command_runs_as_root(kind)
    control = ControlDirectory()
    try:
        mounts = [(f"kvmletshare{index}", path) for index, path in enumerate(extra)]
        if workdir != "/":
            mounts.append((WORKDIR_TAG, workdir))
        mounts.sort(key=lambda mount: len(mount[1]))  # a directory before those inside it
        control.write_request(
            command,
            environment=guest_environment(os.environ if env is None else env),
            workdir=workdir,
            uid=0 if as_root else os.getuid(),
            gid=0 if as_root else os.getgid(),
            groups=[0] if as_root else os.getgroups(),
            mounts=[(kind, tag, path) for tag, path in mounts],
            stream_stdin=stdin is not None,
        )
        if isinstance(stdin, bytes | bytearray):
            control.write_input(bytes(stdin))
        shared = with_host_directories(base, kind, [(tag, path, False) for tag, path in mounts])
        run_config = with_root_share(
            replace(
                shared,
                shares=(ShareConfig(control.path, CONTROL_TAG), *shared.shares),
                extra_parameters=(*shared.extra_parameters, "quiet", f"kvmlet.ctl={CONTROL_TAG}"),
            ),
            root,
            transport=kind,
        )
        collected: list[tuple[str, bytes]] = []
        control.relay_output(
            {
                "stdout": _sink(collected, "stdout", stdout),
                "stderr": _sink(collected, "stderr", stderr),
            }
        )
        with Machine(run_config, console_echo_fd=echo_fd) as machine:
            if isinstance(stdin, int):
                control.feed_stdin(stdin)
            stop, interrupted = _wait(machine, control, timeout)
            elapsed = time.monotonic() - (machine.started or machine.created)
            transcript = machine.console.transcript()
            stats = machine.stats()
        control.finish()
        status = control.status()
        started = control.started()
    finally:
        control.close()
    if status is None and not started and not interrupted and stop.reason is not StopReason.TIMEOUT:
        why = None
        if stop.reason is not StopReason.USER_SPACE_UNSUPPORTED:
            why = explain_boot_failure(transcript.decode(errors="replace"))
        raise GuestStoppedError(
            f"the command did not run: {why or stop} after {elapsed:.1f} s", stop
        )
    out = b"".join(data for name, data in collected if name == "stdout")
    err = b"".join(data for name, data in collected if name == "stderr")
    output = b"".join(data for _, data in collected).decode(errors="replace")
    return SandboxResult(status, output, stop, stats, out, err, interrupted, kind)


def _sink(collected: list[tuple[str, bytes]], name: str, fd: int | None):
    """Where the guest's output goes: to `fd` as it comes, else into the result."""
    if fd is not None:
        return lambda data: _write_all(fd, data)
    return lambda data: collected.append((name, data))


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view) :]
        except BlockingIOError:
            time.sleep(0.01)
        except OSError:  # the reader went away (a closed pipe): the output is still kept
            return


def _wait(machine: Machine, control: ControlDirectory, timeout: float) -> tuple[GuestStop, bool]:
    """Wait for the guest; a first KeyboardInterrupt sends the command SIGINT and leaves it
    INTERRUPT_GRACE seconds, a second one stops the guest."""
    interrupted = False
    deadline = time.monotonic() + timeout
    while True:
        try:
            return machine.wait(max(0.0, deadline - time.monotonic())), interrupted
        except KeyboardInterrupt:
            if interrupted:
                machine.stop(StopReason.HOST_QUIT, "interrupted")
                return machine.wait(), True
            interrupted = True
            control.send_signal("INT")
            deadline = min(deadline, time.monotonic() + INTERRUPT_GRACE)


def run_in_guest(
    command: str,
    config: MachineConfig | None = None,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    echo_fd: int | None = None,
) -> SandboxResult:
    """Run `command` (a shell line) as root in kvmlet's default guest (its own busybox
    initramfs, none of the host's files) and return its result, read from the console
    (stdout and stderr alike in `output`).

    `config` sets memory, CPUs, disks...; its kernel defaults to kvmlet's default guest.
    A command still running after `timeout` seconds is stopped: the result then has status
    None, `stop.reason` TIMEOUT and whatever the command printed; a command that stops the
    guest itself (e.g. `reboot -f`) has status None and that stop. Raises GuestStoppedError
    when the guest stopped before it started the command, e.g. because this host's KVM
    cannot run guest user space (`stop.reason` USER_SPACE_UNSUPPORTED).
    """
    base = with_default_guest(config)
    run_config = replace(
        base, extra_parameters=(*base.extra_parameters, "quiet", run_parameter(command))
    )
    with Machine(run_config, console_echo_fd=echo_fd) as machine:
        stop = machine.wait(timeout)
        elapsed = time.monotonic() - (machine.started or machine.created)
        transcript = machine.console.transcript()
        stats = machine.stats()
    status = parse_exit_status(transcript)
    if status is None and stop.reason is not StopReason.TIMEOUT and not command_started(transcript):
        raise GuestStoppedError(f"the command did not run: {stop} after {elapsed:.1f} s", stop)
    return SandboxResult(status, command_output(transcript), stop, stats)


__all__ = ["DEFAULT_TIMEOUT", "SandboxResult", "run_in_guest", "sandbox"]
