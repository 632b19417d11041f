"""`kvmlet sandbox` on this host's software KVM: the guest's init dies at its first system
call, and kvmlet must say so in one line and exit 6, though the sandbox boots with `quiet`
(which hides the `Run /init as init process` line). The CLI's status comes from the
GuestStoppedError that `kvmlet.sandbox()` raises, so this covers the Python API too. One
boot under the instruction emulator: a minute or more of one core.
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from kvmlet.guest import QuietProgress, ensure_default_guest
from kvmlet.vstate.host_profile import detect
from kvmlet.vstate.vcpu_loop import StopReason

pytestmark = [
    pytest.mark.pvm,
    pytest.mark.slow,
    pytest.mark.skipif(detect().name != "pvm", reason="needs the software (PVM) KVM host"),
]


def test_sandbox_says_this_host_cannot_run_the_command_and_exits_6():
    ensure_default_guest(progress=QuietProgress())  # a build is not part of the boot
    result = subprocess.run(
        [sys.executable, "-m", "kvmlet", "sandbox", "--timeout", "400", "--", "echo", "hi"],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=460,
        check=False,
    )
    assert result.stdout == ""
    notice, *rest = result.stderr.strip().splitlines()
    assert notice.startswith("kvmlet: host profile pvm")
    assert len(rest) == 1, result.stderr
    assert re.fullmatch(
        r"kvmlet: the command did not run: the guest reached user space, which this host "
        r"cannot run: init died at its first system call \(host profile pvm\) after \d+\.\d s",
        rest[0],
    ), rest[0]
    assert result.returncode == StopReason.USER_SPACE_UNSUPPORTED.exit_status == 6
