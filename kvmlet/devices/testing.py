"""Device models in unit tests: a context with guest RAM, a recorded interrupt line and
recorded MSI vectors, whose worker jobs run at once (no thread)."""

from __future__ import annotations

from kvmlet.bus.pci.msi import RecordingMsiController
from kvmlet.devices.context import DeviceContext
from kvmlet.devices.irq import RecordingIrqLine
from kvmlet.memory import GuestMemory

TEST_RAM_SIZE = 1 << 20


def test_context(name: str = "device", memory: GuestMemory | None = None) -> DeviceContext:
    """A `DeviceContext` for a test: `memory` (default: 1 MiB of fresh RAM at 0), `irq` a
    `RecordingIrqLine`, `msi` a `RecordingMsiController`, jobs run inline."""
    if memory is None:
        memory = GuestMemory.anonymous([(0, TEST_RAM_SIZE)])
    return DeviceContext(
        name,
        memory,
        irq=RecordingIrqLine(),
        msi=RecordingMsiController(),
        worker_mode="inline",
    )


test_context.__test__ = False  # not a test itself, whatever pytest's name rules say
