"""`kvmlet run --record FILE`: the record file of one machine (format in devices/journal.py).

The bus's trace hooks write every port and MMIO access that reaches kvmlet with what the
device answered; the user's devices write their own accesses (under their lock, so a worker's
completion lands in order), clock readings, guest memory reads and writes, interrupts and job
completions through their context's journal; the RTC's clock readings and the console's input
are recorded as they reach their device. The header says what `kvmlet replay` must rebuild.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from kvmlet.bus import AddressSpace
from kvmlet.bus.watch import current_vcpu
from kvmlet.devices.journal import JournalWriter
from kvmlet.errors import GuestMemoryError, KvmletError

if TYPE_CHECKING:
    from kvmlet.machine.machine import Machine
    from kvmlet.machine.user_devices import PlacedDevice

RECORD_BUFFER = 1 << 20
"""Bytes buffered before a write to the file: a recording costs few system calls."""


class RecordJournal:
    """The `DeviceJournal` of a recording machine: runs each action, writes what it did."""

    replaying = False

    def __init__(self, writer: JournalWriter):
        self.writer = writer

    def access(
        self, region: str, mmio: bool, address: int, size: int, is_write: bool, value: int
    ) -> None:
        self.writer.access(mmio, address, size, is_write, value, region, current_vcpu())

    def clock(self, device: str, job: int, read: Callable[[], float]) -> float:
        value = read()
        self.writer.clock(device, job, value)
        return value

    def dma_read(
        self, device: str, job: int, address: int, length: int, read: Callable[[], bytes]
    ) -> bytes:
        try:
            data = read()
        except GuestMemoryError:
            self.writer.dma(False, device, job, address, length, None)
            raise
        self.writer.dma(False, device, job, address, length, data)
        return data

    def dma_write(
        self, device: str, job: int, address: int, data: bytes, write: Callable[[], None]
    ) -> None:
        try:
            write()
        except GuestMemoryError:
            self.writer.dma(True, device, job, address, len(data), None)
            raise
        self.writer.dma(True, device, job, address, len(data), data)

    def irq(self, device: str, job: int, kind: int, value: int, deliver: Callable[[], None]):
        deliver()
        self.writer.irq(device, job, kind, value)

    def done(self, device: str, job: int, apply: Callable[[], None]) -> None:
        apply()
        self.writer.done(device, job)

    def defer(self, device: str, job: int, run: Callable[[], None]) -> None:
        raise AssertionError("a recording runs its jobs")


class Recorder:
    """The record file of one machine; `begin(header)` once the machine is built."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = os.fspath(path)
        try:
            self.file = open(self.path, "wb", buffering=RECORD_BUFFER)  # noqa: SIM115
        except OSError as error:
            raise KvmletError(f"cannot write record file {self.path}: {error.strerror}") from None
        self.writer = JournalWriter(self.file)
        self.journal = RecordJournal(self.writer)
        self.own_regions: set[str] = set()
        """Regions whose device journals its own accesses: the trace hooks skip them."""

    def begin(self, header: dict[str, Any]) -> None:
        """Write the header (see `record_header`) and what was recorded before it."""
        self.writer.begin(header)

    def attach(self, io: AddressSpace, mmio: AddressSpace) -> None:
        """Record every access of both spaces (beside their other trace hooks)."""
        io.add_trace(self._trace_io)
        mmio.add_trace(self._trace_mmio)

    def _trace_io(self, space, address, size, is_write, value, region) -> None:
        if region not in self.own_regions:
            self.writer.access(False, address, size, is_write, value, region, current_vcpu())

    def _trace_mmio(self, space, address, size, is_write, value, region) -> None:
        if region not in self.own_regions:
            self.writer.access(True, address, size, is_write, value, region, current_vcpu())

    def clock(self, device: str, read: Callable[[], float] = time.time) -> Callable[[], float]:
        """A clock for a legacy device whose readings are recorded."""
        return lambda: self.journal.clock(device, 0, read)

    def input(self, device: str, receive: Callable[[bytes], int]) -> Callable[[bytes], int]:
        """`receive` with the bytes the device takes recorded (console input)."""

        def recorded(data: bytes) -> int:
            taken = receive(data)
            if taken:
                self.writer.input(device, data[:taken])
            return taken

        return recorded

    def device_added(self, placed: PlacedDevice, regions: set[str]) -> None:
        """A user device was placed: its regions journal their own accesses; one added after
        the header (hot-added) is recorded where it happened."""
        self.own_regions.update(regions)
        if self.writer.begun:
            self.writer.device_added(placed.spec())

    def close(self) -> None:
        self.file.close()


def record_header(machine: Machine) -> dict[str, Any]:
    """What `kvmlet replay` must rebuild of `machine`."""
    from kvmlet import __version__

    config = machine.config
    devices = machine._devices
    return {
        "kvmlet": __version__,
        "memory": config.memory,
        "cpus": config.cpus,
        "console": config.console,
        "debug_exit_port": config.debug_exit_port,
        "devices": [] if devices is None else [placed.spec() for placed in devices],
        "pci_functions": {str(n): f.name for n, f in machine.pci.bus.functions.items()},
    }
