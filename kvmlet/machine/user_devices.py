"""The user's own device models: made from their `DeviceConfig`, placed, started, closed.

A port or MMIO device's region goes at its address, which must be free (no device, no RAM
there); a PCI function goes into its slot (or the first free one) with its BARs assigned from
the machine's windows, INTA# on the slot's IOAPIC pin (every slot's route is in the MP table)
and an MSI controller. The same code places them when the machine is built, when one is
hot-added to a running machine (the bus rebuilds; a PCI function answers the guest's next scan
of its slot) and when `kvmlet replay` rebuilds a recorded machine without KVM.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

from kvmlet.bus import AddressSpace, transaction, transactions
from kvmlet.bus.pci import PciDevice, PciHostBridge
from kvmlet.bus.pci import config_space as cfg
from kvmlet.devices.context import DeviceContext, DeviceJournal
from kvmlet.devices.irq import IrqLine
from kvmlet.devices.loading import factory_name, load_factory
from kvmlet.errors import KvmletError
from kvmlet.machine.config import DeviceConfig
from kvmlet.machine.virtio_devices import MMIO_IRQS, intx_irq
from kvmlet.memory import GuestMemory

if TYPE_CHECKING:
    from kvmlet.machine.machine import Machine

KVMLET_IRQS = frozenset({0, 1, 2, 3, 4, 8, 12, 13})
"""ISA lines of kvmlet's own devices (PIT, keyboard, cascade, COM ports, RTC) and those a PC
reserves (mouse, FPU): never a user device's."""


class PlacedDevice(NamedTuple):
    """A user device as placed: its configuration, model, context and where it went."""

    config: DeviceConfig
    name: str
    model: Any
    context: DeviceContext
    slot: int | None

    def region_names(self) -> set[str]:
        """The device's regions (its own, or its BARs')."""
        bars = getattr(self.model, "bars", None)
        if bars is None:
            return {self.name}
        return {bar.region.name for bar in bars if bar is not None}

    def spec(self) -> dict:
        """The JSON a recording keeps to rebuild it (its BARs as they were programmed)."""
        spec = {
            "name": self.name,
            "model": factory_name(self.config.model),
            "at": self.config.at,
            "address": self.config.address,
            "irq": self.config.irq,
            "slot": self.slot,
            "options": dict(self.config.options),
        }
        if isinstance(self.model, PciDevice):
            bars = [bar for bar in self.model.bars if bar is not None]
            spec["bars"] = {str(bar.index): self.model.bar_address(bar.index) for bar in bars}
            spec["command"] = self.model.command
        return spec


class UserDevices:
    """Makes and places device models; see the module docstring."""

    def __init__(
        self,
        io: AddressSpace,
        mmio: AddressSpace,
        pci: PciHostBridge,
        memory: GuestMemory | None,
        irq_line: Callable[[int], IrqLine],
        msi_controller: Callable[[], Any],
        assign_bars: Callable[[PciDevice], Any],
        *,
        journal: DeviceJournal | None = None,
        worker_mode: str = "thread",
        taken_irqs: frozenset[int] = frozenset(),
    ):
        self.io = io
        self.mmio = mmio
        self.pci = pci
        self.memory = memory
        self.irq_line = irq_line
        self.msi_controller = msi_controller
        self.assign_bars = assign_bars
        self.journal = journal
        self.worker_mode = worker_mode
        self.taken_irqs = KVMLET_IRQS | taken_irqs
        self.placed: list[PlacedDevice] = []
        self.started = False

    def __iter__(self):
        return iter(self.placed)

    def add(self, config: DeviceConfig, bars: dict[int, int] | None = None) -> Any:
        """Make the model of `config`, place it and (on a running machine) start it; returns
        the model. `bars` programs a PCI function's BARs at recorded addresses (replay)."""
        config.check()
        factory = load_factory(config.model) if isinstance(config.model, str) else config.model
        name = self._name_for(config, factory)
        slot = self._slot_for(config) if config.at == "pci" else None
        irq_number = intx_irq(slot) if slot is not None else config.irq
        if config.at != "pci" and irq_number is not None:
            self._check_irq(irq_number)
        context = DeviceContext(
            name,
            self.memory,
            irq=self.irq_line(irq_number) if irq_number is not None else None,
            msi=self.msi_controller() if slot is not None else None,
            journal=self.journal,
            worker_mode=self.worker_mode,
        )
        try:
            model = factory(context, **dict(config.options))
        except KvmletError:
            raise
        except Exception as error:
            raise KvmletError(f"device {name}: its model failed to start: {error!r}") from None
        with transaction():
            if slot is not None:
                self._attach_pci(name, model, slot, irq_number, bars)
            else:
                self._place(config, name, model)
        placed = PlacedDevice(config, name, model, context, slot)
        self.placed.append(placed)
        if self.started:
            context.start()
        return model

    def _name_for(self, config: DeviceConfig, factory: Callable[..., Any]) -> str:
        with transactions.lock:  # the trees may change meanwhile (a guest moving a BAR)
            taken = {region.name for space in (self.io, self.mmio) for region in space.regions()}
        taken |= {placed.name for placed in self.placed}
        if config.name is not None:
            if config.name in taken:
                raise KvmletError(f"a device or region named {config.name!r} exists already")
            return config.name
        base = getattr(factory, "__name__", "device").lower()
        name, number = base, 1
        while name in taken:
            number += 1
            name = f"{base}{number}"
        return name

    def _slot_for(self, config: DeviceConfig) -> int:
        functions = self.pci.bus.functions
        if config.slot is not None:
            if any((config.slot << 3) | f in functions for f in range(8)):
                raise KvmletError(f"PCI slot {config.slot} is taken")
            return config.slot
        for slot in range(1, 32):
            if not any((slot << 3) | f in functions for f in range(8)):
                return slot
        raise KvmletError("no free PCI slot for another device")

    def _check_irq(self, irq: int) -> None:
        used = {p.config.irq for p in self.placed if p.config.at != "pci" and p.config.irq}
        if not 1 <= irq <= 15 or irq in self.taken_irqs or irq in used:
            raise KvmletError(
                f"interrupt line {irq} is not free for a device: choose an ISA line 1-15 "
                f"that is not {', '.join(map(str, sorted(self.taken_irqs | used)))}"
            )

    def _place(self, config: DeviceConfig, name: str, model: Any) -> None:
        if not hasattr(model, "region"):
            raise KvmletError(
                f"device {name}: a {config.at} device must be a kvmlet.devices.Device"
            )
        space = self.io if config.at == "port" else self.mmio
        region = model.region()
        start, end = config.address, config.address + region.size
        if end > space.size:
            raise KvmletError(f"device {name} at {start:#x} runs past the end of {space.name}")
        for flat in space.view.assigned():
            if flat.start < end and start < flat.end:
                raise KvmletError(
                    f"device {name} at {start:#x}-{end - 1:#x} overlaps {flat.region.name} "
                    f"({flat.start:#x}-{flat.end - 1:#x})"
                )
        space.root.add_subregion(start, region)

    def _attach_pci(
        self, name: str, model: Any, slot: int, irq: int, bars: dict[int, int] | None
    ) -> None:
        if not isinstance(model, PciDevice):
            raise KvmletError(f"device {name}: a PCI device must be a kvmlet.devices.PciFunction")
        model.config.set(cfg.INTERRUPT_LINE, 1, irq)  # as firmware would set it
        self.pci.attach(model, slot=slot)
        if bars is None:
            self.assign_bars(model)
            return
        for index, address in bars.items():
            model.program_bar(index, address)

    def state_owners(self) -> dict[str, Any]:
        """Each device's model, which saves its own state (`Device.save_state`)."""
        return {f"device:{placed.name}": placed.model for placed in self.placed}

    def drain(self, timeout: float) -> None:
        """Wait for every device's worker jobs to finish (a snapshot cannot carry a job in
        flight); KvmletError naming the first device still busy after `timeout`."""
        for placed in self.placed:
            for worker in placed.context.workers:
                if not worker.drain(timeout):
                    raise KvmletError(
                        f"device {placed.name} still runs a job after {timeout:g} s: a "
                        "snapshot cannot carry it"
                    )

    def start(self) -> None:
        """The machine started: start every device's workers (and those added later)."""
        self.started = True
        for placed in self.placed:
            placed.context.start()

    def close(self) -> None:
        for placed in reversed(self.placed):
            placed.context.close()
            close = getattr(placed.model, "close", None)
            if close is not None:
                close()


def machine_devices(machine: Machine) -> UserDevices:
    """The user devices of a KVM machine: KVM interrupt lines and MSI routes, its BAR
    windows, its recording journal if it records."""
    from kvmlet.vstate.interrupts import KvmIrqLine

    virtio_mmio = machine.config.virtio_transport == "mmio"
    used = MMIO_IRQS[: len(machine.virtio.transports)] if virtio_mmio else ()
    recorder = machine.recorder
    return UserDevices(
        machine.io,
        machine.mmio,
        machine.pci,
        machine.memory,
        lambda gsi: KvmIrqLine(machine.vm, gsi),
        lambda: machine.interrupt_router().controller(),
        machine.bar_allocator.assign,
        journal=recorder.journal if recorder is not None else None,
        taken_irqs=frozenset(used),
    )
