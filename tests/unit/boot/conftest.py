"""Fixtures for the boot-loader tests: a small machine's memory map and guest RAM."""

from __future__ import annotations

import pytest

from kvmlet.boot.memory_map import MemoryMap, MiB
from kvmlet.memory import GuestMemory


@pytest.fixture
def memory_map():
    return MemoryMap(64 * MiB)


@pytest.fixture
def memory(memory_map):
    guest = GuestMemory.anonymous(memory_map.ram_banks())
    yield guest
    guest.close()
