"""What a device model gets from the machine, and the base classes of port and MMIO devices.

A model is made by a factory called with a `DeviceContext` (and the options of its
configuration): its name, its lock (held by the bus around register handlers and by a worker
around job completions), its interrupt line (`irq`) or MSI controller (`msi`), the guest's RAM
through the bounds-checked `memory`, a `clock()` and `worker()`s for slow work. A port or MMIO
device derives from `Device` (or `RegisterDevice`, a `Device` made of a `RegisterBlock`); a PCI
function from `kvmlet.devices.pci_function.PciFunction`.

Everything a model does that a replay must reproduce goes through the context: clock readings,
guest memory reads and writes, interrupts, worker jobs. While recording (`journal` set), the
context writes each to the record file; while replaying, the journal answers from the file and
checks that the model does what it did. Without a journal the context adds one attribute test.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from kvmlet.bus import AccessSizes, IoRegion
from kvmlet.devices.irq import IrqLine
from kvmlet.devices.registers import Register, RegisterBlock
from kvmlet.errors import GuestMemoryError, KvmletError

if TYPE_CHECKING:
    from kvmlet.bus.pci.msi import MsiController, MsiVector
    from kvmlet.devices.worker import DeviceWorker
    from kvmlet.memory import GuestMemory

IRQ_LEVEL, IRQ_PULSE, IRQ_MSI = range(3)
_job = threading.local()


def current_job(context: DeviceContext) -> int:
    """The worker job of `context` the calling thread runs (0: none, a register access)."""
    running = getattr(_job, "running", None)
    return running[1] if running is not None and running[0] is context else 0


def enter_job(context: DeviceContext, job: int) -> object:
    previous = getattr(_job, "running", None)
    _job.running = (context, job)
    return previous


def leave_job(previous: object) -> None:
    _job.running = previous


class DeviceJournal(Protocol):
    """Records (or, replaying, answers and checks) what a device model does. Each method gets
    the real action as a callable, which a recording journal runs and a replay skips."""

    replaying: bool

    def access(
        self, region: str, mmio: bool, address: int, size: int, is_write: bool, value: int
    ) -> None: ...

    def clock(self, device: str, job: int, read: Callable[[], float]) -> float: ...

    def dma_read(
        self, device: str, job: int, address: int, length: int, read: Callable[[], bytes]
    ) -> bytes: ...

    def dma_write(
        self, device: str, job: int, address: int, data: bytes, write: Callable[[], None]
    ) -> None: ...

    def irq(
        self, device: str, job: int, kind: int, value: int, deliver: Callable[[], None]
    ) -> None: ...

    def done(self, device: str, job: int, apply: Callable[[], None]) -> None: ...

    def defer(self, device: str, job: int, run: Callable[[], None]) -> None: ...


class DeviceMemory:
    """Guest RAM as a device sees it: bounds-checked reads and writes (a `GuestMemoryError`,
    a `KvmletError`, for anything outside RAM: the guest chose the address), recorded."""

    def __init__(self, context: DeviceContext, memory: GuestMemory | None):
        self._context = context
        self._memory = memory

    def read(self, address: int, length: int) -> bytes:
        context, memory = self._context, self._memory
        journal = context.journal
        if journal is None:
            return memory.read(address, length)
        job = current_job(context)
        return journal.dma_read(
            context.name, job, address, length, lambda: memory.read(address, length)
        )

    def write(self, address: int, data: bytes | bytearray | memoryview) -> None:
        context, memory = self._context, self._memory
        journal = context.journal
        if journal is None:
            memory.write(address, data)
            return
        data = bytes(data)
        journal.dma_write(
            context.name, current_job(context), address, data, lambda: memory.write(address, data)
        )

    def read_u8(self, address: int) -> int:
        return self.read(address, 1)[0]

    def read_u16(self, address: int) -> int:
        return int.from_bytes(self.read(address, 2), "little")

    def read_u32(self, address: int) -> int:
        return int.from_bytes(self.read(address, 4), "little")

    def read_u64(self, address: int) -> int:
        return int.from_bytes(self.read(address, 8), "little")

    def write_u8(self, address: int, value: int) -> None:
        self.write(address, (value & 0xFF).to_bytes(1, "little"))

    def write_u16(self, address: int, value: int) -> None:
        self.write(address, (value & 0xFFFF).to_bytes(2, "little"))

    def write_u32(self, address: int, value: int) -> None:
        self.write(address, (value & 0xFFFF_FFFF).to_bytes(4, "little"))

    def write_u64(self, address: int, value: int) -> None:
        self.write(address, (value & (1 << 64) - 1).to_bytes(8, "little"))


class _JournaledLine:
    """An `IrqLine` whose every change is journaled."""

    def __init__(self, context: DeviceContext, line: IrqLine):
        self._context = context
        self._line = line

    def set_level(self, high: bool) -> None:
        context = self._context
        context.journal.irq(
            context.name,
            current_job(context),
            IRQ_LEVEL,
            int(high),
            lambda: self._line.set_level(high),
        )

    def pulse(self) -> None:
        context = self._context
        context.journal.irq(context.name, current_job(context), IRQ_PULSE, 0, self._line.pulse)


class _JournaledVector:
    def __init__(self, context: DeviceContext, index: int, vector: MsiVector):
        self._context = context
        self._index = index
        self._vector = vector

    def update(self, address: int, data: int, masked: bool) -> None:
        self._vector.update(address, data, masked)

    def fire(self) -> None:
        context = self._context
        job = current_job(context)
        context.journal.irq(context.name, job, IRQ_MSI, self._index, self._vector.fire)


class _JournaledMsi:
    def __init__(self, context: DeviceContext, controller: MsiController):
        self._context = context
        self._controller = controller
        self._vectors: dict[int, _JournaledVector] = {}

    def vector(self, index: int) -> _JournaledVector:
        if index not in self._vectors:
            vector = self._controller.vector(index)
            self._vectors[index] = _JournaledVector(self._context, index, vector)
        return self._vectors[index]

    def batch(self):
        return self._controller.batch()


class DeviceContext:
    """The machine's side of one device model; see the module docstring.

    `worker_mode`: "thread" (a machine: jobs run on a thread of their own, from `start()`) or
    "inline" (unit tests: a job runs at once, in the caller's thread)."""

    def __init__(
        self,
        name: str,
        memory: GuestMemory | None = None,
        *,
        irq: IrqLine | None = None,
        msi: MsiController | None = None,
        journal: DeviceJournal | None = None,
        worker_mode: str = "thread",
    ):
        self.name = name
        self.lock = threading.RLock()
        self.journal = journal
        self.memory = DeviceMemory(self, memory)
        journaled = journal is not None
        self.irq: IrqLine | None = irq
        self.msi: Any = msi
        if journaled and irq is not None:
            self.irq = _JournaledLine(self, irq)
        if journaled and msi is not None:
            self.msi = _JournaledMsi(self, msi)
        self.worker_mode = worker_mode
        self.workers: list[DeviceWorker] = []
        self.job_numbers = itertools.count(1)
        self.started = False

    def __repr__(self) -> str:
        return f"<DeviceContext {self.name!r}>"

    def clock(self) -> float:
        """Seconds of a monotonic clock (recorded: a replay sees the same readings)."""
        journal = self.journal
        if journal is None:
            return time.monotonic()
        return journal.clock(self.name, current_job(self), time.monotonic)

    def worker(self) -> DeviceWorker:
        """A worker for slow jobs (see `kvmlet.devices.worker`), stopped with the machine."""
        from kvmlet.devices.worker import DeviceWorker

        worker = DeviceWorker(self, len(self.workers))
        self.workers.append(worker)
        if self.started:
            worker.start()
        return worker

    def start(self) -> None:
        """The machine started: workers begin running jobs."""
        self.started = True
        for worker in self.workers:
            worker.start()

    def close(self) -> None:
        for worker in self.workers:
            worker.close()


class _JournaledOps:
    """A device's register handlers with every access journaled under the device lock, so a
    worker's completion and the accesses around it are recorded in the order they happened."""

    def __init__(self, context: DeviceContext, ops: Any):
        self.context = context
        self.ops = ops
        self.region: IoRegion | None = None

    def _journal(self, offset: int, size: int, is_write: bool, value: int) -> None:
        region = self.region
        assert region is not None
        spaces = region.root().spaces
        mmio = bool(spaces) and not spaces[0].port_io
        address = region.absolute_offset() + offset
        self.context.journal.access(region.name, mmio, address, size, is_write, value)

    def read(self, offset: int, size: int) -> int:
        value = self.ops.read(offset, size) & ((1 << (8 * size)) - 1)
        self._journal(offset, size, False, value)
        return value

    def write(self, offset: int, size: int, value: int) -> None:
        self.ops.write(offset, size, value)
        self._journal(offset, size, True, value)


def device_region(
    context: DeviceContext,
    name: str,
    size: int,
    ops: Any,
    valid: AccessSizes,
    impl: AccessSizes,
) -> IoRegion:
    """An `IoRegion` for a device's registers, under the device's lock, journaled when
    recording."""
    journal = context.journal
    if journal is None or journal.replaying:
        return IoRegion(name, size, ops, valid=valid, impl=impl, lock=context.lock)
    journaled = _JournaledOps(context, ops)
    region = IoRegion(name, size, journaled, valid=valid, impl=impl, lock=context.lock)
    journaled.region = region
    return region


class Device:
    """Base of a device placed at a port range or an MMIO range: `size` bytes of registers
    served by `read`/`write`; `valid` is what the guest may use, `impl` what the handlers
    take (the bus adapts the rest, see docs/design.md)."""

    valid = AccessSizes(1, 4)
    impl = AccessSizes(1, 4)

    def __init__(self, context: DeviceContext, size: int):
        if size <= 0:
            raise ValueError(f"device {context.name!r}: size must be positive")
        self.context = context
        self.size = size

    def read(self, offset: int, size: int) -> int:
        raise NotImplementedError

    def write(self, offset: int, size: int, value: int) -> None:
        raise NotImplementedError

    def save_state(self) -> dict[str, Any]:
        """What a snapshot keeps of the device: override it, with `load_state`, to snapshot
        a machine that has the device (the default refuses, naming the device)."""
        raise KvmletError(
            f"device {type(self).__name__} has no save_state(): give it save_state() and "
            "load_state() to snapshot a machine with it"
        )

    def load_state(self, state: dict[str, Any]) -> None:
        """Take what `save_state` returned, in a device just made by its factory."""
        raise KvmletError(f"device {type(self).__name__} has no load_state()")

    def region(self) -> IoRegion:
        """The region the machine places (named after the device)."""
        return device_region(
            self.context, self.context.name, self.size, self, self.valid, self.impl
        )

    def close(self) -> None:
        """The machine is closing (workers are stopped by the context)."""


class RegisterDevice(Device):
    """A `Device` whose registers are a `RegisterBlock`: `self[name]` reads and sets them."""

    def __init__(self, context: DeviceContext, size: int, registers: list[Register]):
        super().__init__(context, size)
        self.registers = RegisterBlock(size, registers)
        self.valid = self.registers.valid
        self.impl = self.registers.impl
        self.read = self.registers.read  # the bus calls the block directly
        self.write = self.registers.write

    def save_state(self) -> dict[str, Any]:
        """The registers' stored values; a device with more state extends it."""
        return {"registers": self.registers.save_state()}

    def load_state(self, state: dict[str, Any]) -> None:
        self.registers.load_state(state["registers"])

    def __getitem__(self, name: str) -> int:
        return self.registers[name]

    def __setitem__(self, name: str, value: int) -> None:
        self.registers[name] = value

    def set_bits(self, name: str, bits: int) -> None:
        self.registers.set_bits(name, bits)

    def clear_bits(self, name: str, bits: int) -> None:
        self.registers.clear_bits(name, bits)


__all__ = [
    "Device",
    "DeviceContext",
    "DeviceJournal",
    "DeviceMemory",
    "GuestMemoryError",
    "RegisterDevice",
    "current_job",
    "device_region",
]
