"""Where guest tests run: on hardware KVM directly, or inside the test box on our machines."""

from __future__ import annotations

import os

from kvmlet.vstate.host_profile import detect

IN_TEST_BOX = os.environ.get("KVMLET_TESTBOX") == "1"
BOOT_TIMEOUT = 120.0
"""Seconds a guest test waits for a boot or a command (~10 s in the test box, ~1 s on hardware)."""


def user_space_runs_here() -> bool:
    """Whether this host's KVM runs guest user space (not the pvm software KVM)."""
    return detect().name == "none"
