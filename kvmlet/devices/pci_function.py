"""`PciFunction`: a PCI device model built from register blocks, with INTx or MSI.

A subclass declares its identity (vendor, device, class), its BARs (`add_register_bar` with a
`RegisterBlock` or any object with `read`/`write` and a `size`), any other capability
(`add_capability`, inherited from `PciDevice`), and which interrupts it has: INTx (pin A, a
level line) and/or MSI (one vector). `raise_interrupt()` sends the MSI message when the guest
enabled MSI, else asserts INTx (unless the guest set INTx-disable) and the status register's
interrupt bit; `lower_interrupt()` deasserts INTx. While the guest has MSI enabled, INTx stays
deasserted (a request made before it enabled MSI comes back on INTx if it disables MSI). The
function's header lock is its context's lock, so BAR registers, configuration accesses and
worker completions never interleave.

The machine attaches it to the PCI bus, assigns its BARs as firmware would and gives its
context the slot's INTx line and an MSI controller; hot-added, it appears to a guest rescan.
"""

from __future__ import annotations

from typing import Any

from kvmlet.bus.pci import BarKind, PciDevice
from kvmlet.bus.pci import config_space as cfg
from kvmlet.bus.pci.msi_capability import Msi
from kvmlet.bus.region import IoRegion
from kvmlet.devices.context import DeviceContext, device_region
from kvmlet.devices.registers import RegisterBlock
from kvmlet.errors import KvmletError

MIN_BAR_SIZE = {BarKind.IO: 4, BarKind.MEM32: 16, BarKind.MEM64: 16}


class PciFunction(PciDevice):
    """A PCI function whose context the machine made; see the module docstring."""

    def __init__(
        self,
        context: DeviceContext,
        *,
        vendor_id: int,
        device_id: int,
        class_code: int,
        revision: int = 0,
        subsystem_vendor_id: int = 0,
        subsystem_id: int = 0,
        intx: bool = True,
        msi: bool = False,
    ):
        super().__init__(
            context.name,
            vendor_id,
            device_id,
            class_code,
            revision,
            subsystem_vendor_id,
            subsystem_id,
            interrupt_pin=1 if intx else 0,
        )
        self.context = context
        self.lock = context.lock
        self.intx = intx
        self.interrupt_requested = False
        self.intx_asserted = False
        self.msi: Msi | None = None
        self.bar_blocks: dict[int, Any] = {}
        if msi:
            if context.msi is None:
                raise ValueError(f"{context.name}: MSI needs the context's MSI controller")
            self.msi = Msi(self, context.msi, self._update_intx)

    def add_register_bar(
        self,
        index: int,
        block: RegisterBlock | Any,
        kind: BarKind = BarKind.MEM32,
        size: int | None = None,
    ) -> IoRegion:
        """BAR `index` decoding to `block` (size: the block's, rounded up to a power of two)."""
        if size is None:
            size = max(MIN_BAR_SIZE[kind], 1 << (block.size - 1).bit_length())
        valid = getattr(block, "valid", RegisterBlock.impl)
        impl = getattr(block, "impl", RegisterBlock.impl)
        region = device_region(self.context, f"{self.name}-bar{index}", size, block, valid, impl)
        self.add_bar(index, kind, size, region)
        self.bar_blocks[index] = block
        return region

    def save_state(self) -> dict[str, Any]:
        """The configuration space, the interrupt request and the register blocks of the
        BARs (any other block must save itself: override this and `load_state`)."""
        blocks = {}
        for index, block in self.bar_blocks.items():
            if not isinstance(block, RegisterBlock):
                raise KvmletError(
                    f"device {type(self).__name__}: BAR {index} is not a RegisterBlock; "
                    "override save_state() and load_state() to snapshot it"
                )
            blocks[str(index)] = block.save_state()
        with self.lock:
            return {
                **super().save_state(),
                "interrupt_requested": self.interrupt_requested,
                "intx_asserted": self.intx_asserted,
                "bars": blocks,
            }

    def load_state(self, state: dict[str, Any]) -> None:
        """Header (BARs mapped), MSI vector programmed, register blocks and INTx as saved."""
        with self.lock:
            super().load_state(state)
            for index, saved in state["bars"].items():
                self.bar_blocks[int(index)].load_state(saved)
            if self.msi is not None:
                self.msi.republish()
            self.interrupt_requested = bool(state["interrupt_requested"])
            self.intx_asserted = bool(state["intx_asserted"])

    def raise_interrupt(self) -> None:
        """Signal the guest: an MSI message when enabled, else assert INTx."""
        with self.lock:
            if self.msi is not None and self.msi.fire():
                return
            self.interrupt_requested = True
            self._update_intx()

    def lower_interrupt(self) -> None:
        """Deassert INTx (an MSI has nothing to lower)."""
        with self.lock:
            self.interrupt_requested = False
            self._update_intx()

    def _update_intx(self) -> None:
        """Drive INTx from the request, INTx-disable and MSI enable (lock held)."""
        msi_on = self.msi is not None and self.msi.enabled
        asserted = (
            self.intx
            and self.interrupt_requested
            and not msi_on
            and not self.command & cfg.COMMAND_INTX_DISABLE
        )
        self.set_interrupt_status(self.interrupt_requested and self.intx)
        if asserted != self.intx_asserted:
            self.intx_asserted = asserted
            if self.context.irq is not None:
                self.context.irq.set_level(asserted)

    def command_changed(self, old: int, new: int) -> None:
        if (old ^ new) & cfg.COMMAND_INTX_DISABLE:
            self._update_intx()

    def close(self) -> None:
        """The machine is closing (workers are stopped by the context)."""
