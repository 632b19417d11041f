"""Fixtures for the virtio unit tests: a small fake guest memory."""

from __future__ import annotations

import pytest

from kvmlet.memory import GuestMemory
from tests.helpers.virtio_driver import GUEST_RAM_SIZE


@pytest.fixture
def memory():
    return GuestMemory.anonymous([(0, GUEST_RAM_SIZE)])
