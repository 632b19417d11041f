"""Interrupt lines as devices see them.

A device model never talks to KVM: it is handed an `IrqLine` and raises or lowers it. The
machine supplies the implementation (KVM_IRQ_LINE on the in-kernel irqchip, or an irqfd); tests
supply `RecordingIrqLine`.
"""

from __future__ import annotations

from typing import Protocol


class IrqLine(Protocol):
    """One interrupt input of the interrupt controller."""

    def set_level(self, high: bool) -> None:
        """Drive a level-triggered line high or low."""

    def pulse(self) -> None:
        """Signal an edge: raise the line and lower it again."""


class RecordingIrqLine:
    """An `IrqLine` that remembers its level and every change (for tests and tracing)."""

    def __init__(self) -> None:
        self.level = False
        self.history: list[bool] = []

    def set_level(self, high: bool) -> None:
        self.level = high
        self.history.append(high)

    def pulse(self) -> None:
        self.set_level(True)
        self.set_level(False)
