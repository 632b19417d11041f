"""Where guest tests run: on hardware KVM directly, or inside the test box on our machines."""

from __future__ import annotations

import os

from kvmlet.vstate.host_profile import detect

IN_TEST_BOX = os.environ.get("KVMLET_TESTBOX") == "1"
BOOT_TIMEOUT = 120.0
"""Seconds a guest test waits for a boot or a command (~10 s in the test box, ~1 s on hardware)."""
BOX_STALL_MARKER = "kvmlet-testbox: L1 stopped running nested guests"
"""Printed inside the box when a test failed and a canary tiny guest (two instructions) then
did not run either: the box's own failure, not kvmlet's."""
BOX_TIMED_OUT, BOX_FAILED = 124, 125
"""testbox/run.py's exit statuses for a box that ran out of time or could not run at all."""
CANARY_TIMEOUT = 30.0


def box_stalled(status: int, report: str) -> bool:
    """Whether a test box run failed for the box's own reasons (worth a fresh box), rather
    than because a test failed: the box timed out or failed, or a failed test left the box
    unable to run even a canary guest. Any other failure is a result, never retried."""
    return status in (BOX_TIMED_OUT, BOX_FAILED) or BOX_STALL_MARKER in report


def canary_guest_runs() -> bool:
    """Whether this host's KVM runs a two-instruction guest (an i8042 reset) within
    CANARY_TIMEOUT: False means the nested KVM has stopped running guests."""
    from kvmlet.machine.config import MachineConfig
    from kvmlet.machine.machine import Machine
    from kvmlet.vstate.vcpu_loop import StopReason

    code = bytes.fromhex("b0fe e664")  # mov al, 0xfe ; out 0x64, al
    with Machine(MachineConfig(boot_code=code, rng=False, host_profile="none")) as machine:
        return machine.wait(CANARY_TIMEOUT).reason is StopReason.RESET


def user_space_runs_here() -> bool:
    """Whether this host's KVM runs guest user space (not the pvm software KVM)."""
    return detect().name == "none"
