"""`kvmlet.sandbox()` decides from the console and the stop what its caller gets: a result
once the command started (status None when it reported none), GuestStoppedError when the
guest stopped before the command could start. The machine is a stand-in here; the `linux`
and `pvm` tiers run the real one."""

from __future__ import annotations

import pytest

from kvmlet import sandbox as sandbox_module
from kvmlet.errors import GuestStoppedError
from kvmlet.machine.config import MachineConfig
from kvmlet.vstate.vcpu_loop import GuestStop, StopReason

CONFIG = MachineConfig(kernel="vmlinux", host_profile="none")


class StandInMachine:
    """Plays back one run: the console transcript and how the guest stopped."""

    transcript = b""
    stop = GuestStop(StopReason.RESET)
    configs: list = []

    def __init__(self, config, console_echo_fd=None):
        self.configs.append(config)
        self.console = self
        self.created = self.started = 0.0

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        pass

    def wait(self, timeout):
        return self.stop

    def stats(self):
        return {}


def play(monkeypatch, transcript: bytes, stop: GuestStop):
    monkeypatch.setattr(StandInMachine, "transcript", lambda self: transcript)
    monkeypatch.setattr(StandInMachine, "stop", stop)
    monkeypatch.setattr(sandbox_module, "Machine", StandInMachine)


def test_a_command_that_reported_its_status_returns_it_with_its_output(monkeypatch):
    play(
        monkeypatch, b"kvmlet-guest: ready\r\nhi\r\nkvmlet-exit: 3\r\n", GuestStop(StopReason.RESET)
    )
    result = sandbox_module.sandbox("echo hi; exit 3", CONFIG)
    assert (result.status, result.output) == (3, "hi\n")
    assert "quiet" in StandInMachine.configs[-1].extra_parameters


def test_a_guest_that_never_started_the_command_raises_with_its_stop(monkeypatch):
    stop = GuestStop(StopReason.USER_SPACE_UNSUPPORTED, "/init died at its first system call")
    play(monkeypatch, b"Kernel panic - not syncing: Attempted to kill init!\r\n", stop)
    with pytest.raises(GuestStoppedError) as raised:
        sandbox_module.sandbox("true", CONFIG)
    assert raised.value.stop is stop
    assert str(raised.value).startswith(f"the command did not run: {stop} after ")


def test_a_reset_before_the_command_started_raises(monkeypatch):
    play(monkeypatch, b"Kernel panic - not syncing: VFS\r\n", GuestStop(StopReason.RESET))
    with pytest.raises(GuestStoppedError, match="the command did not run"):
        sandbox_module.sandbox("true", CONFIG)


def test_a_command_that_reset_the_guest_itself_has_no_status(monkeypatch):
    play(monkeypatch, b"kvmlet-guest: ready\r\nbye\r\n", GuestStop(StopReason.RESET))
    result = sandbox_module.sandbox("echo bye; reboot -f", CONFIG)
    assert (result.status, result.output, result.stop.reason) == (None, "bye\n", StopReason.RESET)


def test_a_timeout_returns_no_status_even_before_the_command_started(monkeypatch):
    play(monkeypatch, b"[ 50.0] booting\r\n", GuestStop(StopReason.TIMEOUT))
    result = sandbox_module.sandbox("true", CONFIG, timeout=1)
    assert (result.status, result.stop.reason) == (None, StopReason.TIMEOUT)
