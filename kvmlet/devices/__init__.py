"""Device models: the legacy PC devices kvmlet places itself, and the public API for writing
your own (docs/devices.md is the tutorial).

    from kvmlet.devices import Register, RegisterDevice

    class Scratch(RegisterDevice):
        def __init__(self, context):
            super().__init__(context, 8, [Register("value", 0), Register("id", 4, value=7,
                                                                          read_only=True)])

The API's names load on first use, so the legacy devices' imports stay as they were.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_PUBLIC = {
    "Device": "kvmlet.devices.context",
    "DeviceContext": "kvmlet.devices.context",
    "DeviceMemory": "kvmlet.devices.context",
    "RegisterDevice": "kvmlet.devices.context",
    "GuestMemoryError": "kvmlet.devices.context",
    "DeviceWorker": "kvmlet.devices.worker",
    "Register": "kvmlet.devices.registers",
    "RegisterBlock": "kvmlet.devices.registers",
    "PciFunction": "kvmlet.devices.pci_function",
    "BarKind": "kvmlet.bus.pci",
    "IrqLine": "kvmlet.devices.irq",
    "RecordingIrqLine": "kvmlet.devices.irq",
    "test_context": "kvmlet.devices.testing",
}

__all__ = [
    "BarKind",
    "Device",
    "DeviceContext",
    "DeviceMemory",
    "DeviceWorker",
    "GuestMemoryError",
    "IrqLine",
    "PciFunction",
    "RecordingIrqLine",
    "Register",
    "RegisterBlock",
    "RegisterDevice",
    "test_context",
]

if TYPE_CHECKING:
    from kvmlet.bus.pci import BarKind
    from kvmlet.devices.context import (
        Device,
        DeviceContext,
        DeviceMemory,
        GuestMemoryError,
        RegisterDevice,
    )
    from kvmlet.devices.irq import IrqLine, RecordingIrqLine
    from kvmlet.devices.pci_function import PciFunction
    from kvmlet.devices.registers import Register, RegisterBlock
    from kvmlet.devices.testing import test_context
    from kvmlet.devices.worker import DeviceWorker


def __getattr__(name: str) -> object:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'kvmlet.devices' has no attribute {name!r}")
    return getattr(importlib.import_module(_PUBLIC[name]), name)
