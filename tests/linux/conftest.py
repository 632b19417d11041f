"""The `linux` tier: boots kvmlet's default guest and checks what its user space saw.

It needs a KVM that runs guest user space. On hardware KVM the tests run directly; on our
machines' software KVM (host profile pvm) they run inside the test box instead
(test_in_box.py starts it), and skip here with that reason.
"""

from __future__ import annotations

import sys
from dataclasses import replace

import pytest

from kvmlet.guest import QuietProgress, ensure_default_guest
from kvmlet.machine.config import MachineConfig, with_default_guest
from tests.helpers.guests import (
    BOX_STALL_MARKER,
    IN_TEST_BOX,
    canary_guest_runs,
    user_space_runs_here,
)


def pytest_collection_modifyitems(config, items):
    if user_space_runs_here():
        return
    skip = pytest.mark.skip(reason="this host's KVM cannot run guest user space: see test_in_box")
    for item in items:
        if item.get_closest_marker("linux") and not item.get_closest_marker("box_runner"):
            item.add_marker(skip)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """In the test box, after a failed test: if not even a canary tiny guest runs now, say so
    (BOX_STALL_MARKER), so the runner outside knows a fresh box, not kvmlet, is the remedy."""
    outcome = yield
    report = outcome.get_result()
    if IN_TEST_BOX and report.failed and report.when == "call" and not canary_guest_runs():
        sys.__stdout__.write(f"\n{BOX_STALL_MARKER} (after {item.nodeid})\n")
        sys.__stdout__.flush()


@pytest.fixture(scope="session")
def default_guest():
    return ensure_default_guest(progress=QuietProgress())


@pytest.fixture
def guest_config(default_guest) -> MachineConfig:
    """The default guest with its ELF kernel, as `kvmlet run` boots it."""
    return with_default_guest(MachineConfig(memory=256 << 20))


@pytest.fixture
def bzimage_config(default_guest, guest_config) -> MachineConfig:
    return replace(guest_config, kernel=default_guest.bzimage)
