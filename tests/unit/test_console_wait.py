"""`Console.wait_for`: a match returns at once, a stopped machine ends the wait with its reason
(no need to poll `machine.running`), and only a running machine waits out the timeout."""

from __future__ import annotations

import threading
import time

import pytest

from kvmlet.errors import GuestStoppedError, KvmletError
from kvmlet.host.console import Console
from kvmlet.vstate.vcpu_loop import GuestStop, StopReason


def test_a_printed_pattern_is_returned_as_a_match():
    console = Console()
    console.output(b"booting\nkvmlet-guest: ready\n")
    assert console.wait_for(r"guest: (\w+)", timeout=1).group(1) == "ready"


def test_a_stopped_machine_ends_the_wait_at_once_with_its_reason():
    stop = GuestStop(StopReason.TRIPLE_FAULT, "rip=0x0")
    console = Console(stop_reason=lambda: stop)
    started = time.monotonic()
    with pytest.raises(GuestStoppedError) as raised:
        console.wait_for("never printed", timeout=30)
    assert time.monotonic() - started < 1
    assert raised.value.stop is stop
    assert str(raised.value) == (
        "the guest stopped before printing 'never printed': "
        "the guest triple-faulted (KVM shutdown): rip=0x0"
    )


def test_output_printed_before_the_stop_still_matches():
    console = Console(stop_reason=lambda: GuestStop(StopReason.RESET))
    console.output(b"kvmlet-exit: 0\n")
    assert console.wait_for("kvmlet-exit", timeout=1)


def test_a_stop_while_waiting_ends_the_wait():
    stopped: list[GuestStop] = []
    console = Console(stop_reason=lambda: stopped[0] if stopped else None)
    threading.Timer(0.2, stopped.append, [GuestStop(StopReason.RESET)]).start()
    started = time.monotonic()
    with pytest.raises(GuestStoppedError, match="the guest reset the machine"):
        console.wait_for("never printed", timeout=30)
    assert time.monotonic() - started < 5


def test_a_running_machine_waits_out_the_timeout():
    console = Console()
    with pytest.raises(KvmletError, match=r"timed out after 0.2 s waiting for 'never'") as raised:
        console.wait_for("never", timeout=0.2)
    assert not isinstance(raised.value, GuestStoppedError)


def test_still_running_turning_false_also_ends_the_wait():
    console = Console()
    with pytest.raises(GuestStoppedError, match="stopped waiting for 'never'"):
        console.wait_for("never", timeout=30, still_running=lambda: False)
