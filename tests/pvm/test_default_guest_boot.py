"""`kvmlet run` boots the default guest on this host's software KVM through the pvm profile.

The guest kernel runs instruction by instruction here (~45 s to /init); its init then dies at
the first system call, which this KVM cannot deliver. kvmlet must say so in one line, with the
boot time, and exit with the status for it, instead of leaving the user before a panic.
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


@pytest.mark.parametrize("kernel", ["vmlinux", "bzImage"])
def test_default_guest_reaches_user_space_and_kvmlet_explains_the_end(kernel):
    guest = ensure_default_guest(progress=QuietProgress())
    path = guest.vmlinux if kernel == "vmlinux" else guest.bzimage
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "kvmlet",
            "run",
            "-k",
            str(path),
            "-i",
            str(guest.initrd),
            "--timeout",
            "400",
        ],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=460,
        check=False,
    )
    assert "Run /init as init process" in result.stdout, result.stdout[-3000:]
    # Every parameter of the profile is one the kernel knows (noxsave was not).
    assert "Unknown kernel command line parameters" not in result.stdout
    notice, *rest = result.stderr.strip().splitlines()
    assert notice.startswith("kvmlet: host profile pvm")
    assert len(rest) == 1, result.stderr
    assert re.fullmatch(
        r"kvmlet: the guest reached user space, which this host cannot run: "
        r"/init died at its first system call \(host profile pvm\) after \d+\.\d s",
        rest[0],
    ), rest[0]
    assert result.returncode == StopReason.USER_SPACE_UNSUPPORTED.exit_status
