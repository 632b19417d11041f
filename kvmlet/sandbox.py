"""Run one shell command in a throwaway microVM and get its output and exit status.

The default guest's init runs the command given on the kernel command line, prints its output
on the console between a ready marker and a `kvmlet-exit: N` line, and resets the machine.
Nothing of the guest outlives the call.

    result = kvmlet.sandbox("uname -r; exit 3")
    result.status, result.output   # (3, "6.1...\n")
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

from kvmlet.errors import GuestStoppedError
from kvmlet.guest.run_protocol import (
    command_output,
    command_started,
    parse_exit_status,
    run_parameter,
)
from kvmlet.machine.config import MachineConfig, with_default_guest
from kvmlet.machine.machine import Machine
from kvmlet.vstate.vcpu_loop import GuestStop, StopReason

DEFAULT_TIMEOUT = 600.0


@dataclass(frozen=True)
class SandboxResult:
    """What the command printed, its exit status (None if it never reported one), and how
    the guest stopped."""

    status: int | None
    output: str
    stop: GuestStop
    stats: dict = field(default_factory=dict, repr=False)


def sandbox(
    command: str,
    config: MachineConfig | None = None,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    echo_fd: int | None = None,
) -> SandboxResult:
    """Run `command` (a shell line) in the default guest and return its result.

    `config` sets memory, CPUs, disks...; its kernel defaults to kvmlet's default guest.
    A command still running after `timeout` seconds is stopped: the result then has status
    None, `stop.reason` TIMEOUT and whatever the command printed; a command that stops the
    guest itself (e.g. `reboot -f`) has status None and that stop. Raises GuestStoppedError
    (a KvmletError whose `stop` says how the guest ended) when the guest stopped before it
    started the command, e.g. because this host's KVM cannot run guest user space
    (`stop.reason` USER_SPACE_UNSUPPORTED).
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
