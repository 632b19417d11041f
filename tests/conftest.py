"""Test tiers: unit (no marker), `kvm`, `linux` and `pvm`; KVM tiers skip with a reason.

Tiers are pytest markers (`pytest -m kvm`). This file only decides skips; fixtures that boot
guests live with the tiers that use them.
"""

from __future__ import annotations

import os

import pytest


def kvm_unavailable_reason() -> str | None:
    """Why /dev/kvm cannot be used here, or None when it can."""
    if not os.path.exists("/dev/kvm"):
        return "no /dev/kvm on this machine"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "no read/write permission on /dev/kvm"
    return None


def pytest_collection_modifyitems(config, items):
    reason = kvm_unavailable_reason()
    if reason is None:
        return
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if any(item.get_closest_marker(tier) for tier in ("kvm", "linux", "pvm")):
            item.add_marker(skip)
