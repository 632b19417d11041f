"""Test tiers: unit (no marker), `kvm`, `linux` and `pvm`; KVM tiers skip with a reason.

Tiers are pytest markers (`pytest -m kvm`). This file decides skips and the Hypothesis
profile; fixtures that boot guests live with the tiers that use them.

Hypothesis: no per-example deadline and no "too slow" health check anywhere (a loaded
2-core machine makes both fail tests that are correct). Under CI (`CI` set, as `.ci/run`
does) examples are derandomized, so a red run is reproducible and not luck; elsewhere every
run explores new examples. `HYPOTHESIS_PROFILE` picks a profile explicitly.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "kvmlet", deadline=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True
)
settings.register_profile("kvmlet-ci", parent=settings.get_profile("kvmlet"), derandomize=True)
settings.load_profile(
    os.environ.get("HYPOTHESIS_PROFILE") or ("kvmlet-ci" if os.environ.get("CI") else "kvmlet")
)


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
