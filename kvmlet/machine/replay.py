"""`kvmlet replay FILE`: a recorded run's accesses fed to fresh device models, without KVM.

The replay rebuilds what it can without KVM or the host's resources: the legacy devices (the
RTC reading the recorded clock, COM1 taking the recorded input), the PCI host bridge, the
debug-exit port and the user's devices (their BARs where the run had them, their journal
answering from the file). Then it goes through the events in order: an access is made again
and a read must answer what it answered in the run; what a user device did (clock readings,
guest memory reads and writes, interrupts) is checked as it does it again, and each worker job
runs where the run completed it. The first difference is the divergence it reports.

Accesses to devices a replay does not rebuild (virtio, whose state lives in guest memory and
host files) are skipped and counted, as are configuration accesses to their PCI functions.
"""

from __future__ import annotations

import collections
import os
from collections.abc import Callable
from typing import NamedTuple

from kvmlet.boot.memory_map import MemoryMap
from kvmlet.bus import mmio_space, port_io_space
from kvmlet.bus.pci import CONF1_PORT
from kvmlet.bus.pci.msi import RecordingMsiController
from kvmlet.devices.irq import RecordingIrqLine
from kvmlet.devices.journal import (
    AccessEvent,
    ClockEvent,
    DeviceEvent,
    DmaEvent,
    DoneEvent,
    Event,
    InputEvent,
    IrqEvent,
    JournalReader,
)
from kvmlet.errors import GuestMemoryError, KvmletError
from kvmlet.machine.config import DeviceConfig
from kvmlet.machine.legacy import (
    attach_debug_exit,
    attach_legacy_devices,
    attach_pci_host_bridge,
    reserve_in_kernel_devices,
)
from kvmlet.machine.user_devices import UserDevices

CONF1_DATA = CONF1_PORT + 4


class Divergence(BaseException):
    """A device did something else than in the run. A BaseException so that the bus, which
    keeps a failing handler's Exception from the vCPU, lets it through to the replay."""


class ReplayResult(NamedTuple):
    """What a replay found: the first divergence (None: the devices did it all again)."""

    accesses: int
    skipped: dict[str, int]
    divergence: str | None
    event_index: int | None

    def summary(self) -> str:
        skipped = sum(self.skipped.values())
        text = f"replayed {self.accesses} accesses"
        if skipped:
            names = ", ".join(f"{name} {count}" for name, count in sorted(self.skipped.items()))
            text += f" ({skipped} to devices a replay does not rebuild skipped: {names})"
        if self.divergence is None:
            return text + "; no divergence"
        return f"{text}; first divergence at event {self.event_index}: {self.divergence}"


class ReplayJournal:
    """The `DeviceJournal` of a replay: answers from the recorded events, checks them off."""

    replaying = True

    def __init__(self) -> None:
        self.expected: dict[tuple[str, int], collections.deque] = collections.defaultdict(
            collections.deque
        )
        self.deferred: dict[tuple[str, int], Callable[[], None]] = {}

    def _next(self, device: str, job: int, kind: type, what: str):
        queue = self.expected[(device, job)]
        if not queue or not isinstance(queue[0], kind):
            recorded = _describe(queue[0]) if queue else "nothing more"
            raise Divergence(f"{_doer(device, job)} {what}; in the run it did {recorded}")
        return queue.popleft()

    def access(self, region, mmio, address, size, is_write, value) -> None:
        raise AssertionError("a replay journals no access")

    def clock(self, device: str, job: int, read) -> float:
        return self._next(device, job, ClockEvent, "read the clock").value

    def dma_read(self, device: str, job: int, address: int, length: int, read) -> bytes:
        what = f"read {length} bytes of guest memory at {address:#x}"
        event = self._next(device, job, DmaEvent, what)
        if event.is_write or (event.address, event.length) != (address, length):
            raise Divergence(f"{_doer(device, job)} {what}; in the run it did {_describe(event)}")
        if event.data is None:
            raise GuestMemoryError(f"guest access outside RAM: {length} bytes at {address:#x}")
        return event.data

    def dma_write(self, device: str, job: int, address: int, data: bytes, write) -> None:
        what = f"wrote {data[:16].hex()} ({len(data)} bytes) to guest memory at {address:#x}"
        event = self._next(device, job, DmaEvent, what)
        same_place = event.is_write and (event.address, event.length) == (address, len(data))
        if not same_place or event.data not in (None, data):
            raise Divergence(f"{_doer(device, job)} {what}; in the run it did {_describe(event)}")
        if event.data is None:
            raise GuestMemoryError(f"guest access outside RAM: {len(data)} bytes at {address:#x}")

    def irq(self, device: str, job: int, kind: int, value: int, deliver) -> None:
        what = _describe(IrqEvent(device, job, kind, value))
        event = self._next(device, job, IrqEvent, what)
        if (event.kind, event.value) != (kind, value):
            raise Divergence(f"{_doer(device, job)} {what}; in the run it did {_describe(event)}")
        deliver()

    def done(self, device: str, job: int, apply) -> None:
        apply()

    def defer(self, device: str, job: int, run: Callable[[], None]) -> None:
        self.deferred[(device, job)] = run

    def check_done(self, device: str, job: int) -> None:
        """After an access or a job: everything it did in the run, it did again."""
        queue = self.expected.get((device, job))
        if queue:
            raise Divergence(f"{_doer(device, job)} did not {_describe(queue[0])} as in the run")


def _doer(device: str, job: int) -> str:
    return f"{device}" if job == 0 else f"{device} (job {job})"


def _describe(event: Event) -> str:
    if isinstance(event, ClockEvent):
        return "read the clock"
    if isinstance(event, DmaEvent):
        verb = "write" if event.is_write else "read"
        return f"{verb} {event.length} bytes of guest memory at {event.address:#x}"
    if isinstance(event, IrqEvent):
        return ("set its interrupt line to", "pulse its interrupt line", "send MSI vector")[
            event.kind
        ] + ("" if event.kind == 1 else f" {event.value}")
    return type(event).__name__


class ReplayBoard:
    """The devices of a recorded machine, rebuilt without KVM."""

    def __init__(self, header: dict):
        self.journal = ReplayJournal()
        self.io = port_io_space()
        self.mmio = mmio_space()
        self.legacy = attach_legacy_devices(
            self.io,
            lambda irq: RecordingIrqLine(),
            _discard,
            _nothing,
            lambda: self.journal.clock("cmos-rtc", 0, None),
        )
        reserve_in_kernel_devices(self.io, self.mmio)
        if header.get("debug_exit_port") is not None:
            attach_debug_exit(self.io, int(header["debug_exit_port"]), lambda value, status: None)
        self.pci = attach_pci_host_bridge(self.io, self.mmio, _memory_map(header))
        self.devices = UserDevices(
            self.io,
            self.mmio,
            self.pci,
            None,
            lambda irq: RecordingIrqLine(),
            RecordingMsiController,
            _cannot_assign,
            journal=self.journal,
        )
        for spec in header.get("devices", ()):
            self.add_device(spec)
        rebuilt = set(self.pci.bus.functions)
        recorded = header.get("pci_functions", {})
        self.absent_functions = {int(n) for n in recorded if int(n) not in rebuilt}

    def add_device(self, spec: dict) -> None:
        try:
            config = DeviceConfig(
                spec["model"],
                spec["at"],
                spec.get("address"),
                spec.get("irq"),
                spec.get("slot"),
                spec["name"],
                tuple(spec.get("options", {}).items()),
            )
            bars = {int(index): address for index, address in spec.get("bars", {}).items()}
        except (KeyError, TypeError, AttributeError, ValueError):
            raise KvmletError(f"the recording's device {spec!r} is incomplete") from None
        self.devices.add(config, bars or None)
        if "command" in spec:
            self.devices.placed[-1].model.set_command_bits(int(spec["command"]))

    def region_names(self) -> set[str]:
        return {region.name for space in (self.io, self.mmio) for region in space.regions()}

    def device_of(self, event: AccessEvent) -> str | None:
        """The device whose doings an access may cause (for the check after it)."""
        if event.region == "cmos-rtc":
            return "cmos-rtc"
        if event.region == "pci-conf1":
            function = self.pci.bus.functions.get((self.pci.conf1.address >> 8) & 0xFF)
            return function.name if function is not None else None
        for placed in self.devices:
            if event.region == placed.name or (event.region or "").startswith(placed.name + "-"):
                return placed.name
        return None

    def skips_conf1(self, event: AccessEvent) -> bool:
        """A configuration access to a PCI function the replay did not rebuild."""
        if event.region != "pci-conf1" or event.space != "io" or event.address < CONF1_DATA:
            return False
        address = self.pci.conf1.address
        return bool(address >> 31) and (address >> 8) & 0xFF in self.absent_functions


def replay(path: str | os.PathLike[str]) -> ReplayResult:
    """Replay the record file at `path`; KvmletError if it cannot be read or rebuilt."""
    name = os.fspath(path)
    try:
        with open(name, "rb") as file:
            data = file.read()
    except OSError as error:
        raise KvmletError(f"cannot read record file {name}: {error.strerror}") from None
    reader = JournalReader(data, name)
    board = ReplayBoard(reader.header)
    names = board.region_names()
    accesses = 0
    skipped: dict[str, int] = collections.Counter()
    position = 0
    try:
        for event in reader.events():
            position += 1
            if isinstance(event, AccessEvent):
                if event.region is not None and event.region not in names:
                    skipped[event.region] += 1
                elif board.skips_conf1(event):
                    skipped["pci-conf1"] += 1
                else:
                    _access(board, event)
                    accesses += 1
            elif isinstance(event, ClockEvent | DmaEvent | IrqEvent):
                board.journal.expected[(event.device, event.job)].append(event)
            elif isinstance(event, DoneEvent):
                run = board.journal.deferred.pop((event.device, event.job), None)
                if run is None:
                    raise Divergence(
                        f"{event.device} completed job {event.job} in the run, "
                        f"but never submitted it in the replay"
                    )
                run()
                board.journal.check_done(event.device, event.job)
            elif isinstance(event, InputEvent):
                if event.device == "com1":
                    board.legacy.console_uart.receive(event.data)
            elif isinstance(event, DeviceEvent):
                board.add_device(event.spec)
                names = board.region_names()
        for device, job in list(board.journal.expected):
            if job == 0:  # a job the run never completed was cut off by its end: no check
                board.journal.check_done(device, job)
    except Divergence as divergence:
        return ReplayResult(accesses, dict(skipped), str(divergence), position)
    return ReplayResult(accesses, dict(skipped), None, None)


def _memory_map(header: dict) -> MemoryMap:
    """The recorded machine's memory map (its PCI windows depend on the RAM size)."""
    memory = header.get("memory")
    if not isinstance(memory, int) or isinstance(memory, bool):
        raise KvmletError("the recording's header has no RAM size ('memory')")
    return MemoryMap(memory)


def _access(board: ReplayBoard, event: AccessEvent) -> None:
    space = board.io if event.space == "io" else board.mmio
    flat = space.view.lookup(event.address)
    where = flat.region.name if flat.region is not None else None
    if where != event.region:
        raise Divergence(
            f"{_what(event)} reached {where or 'nothing'} in the replay, "
            f"{event.region or 'nothing'} in the run"
        )
    if event.is_write:
        space.write(event.address, event.size, event.value)
    else:
        value = space.read(event.address, event.size)
        if value != event.value:
            raise Divergence(
                f"{_what(event)}: {event.region or 'unassigned'} answered {value:#x} in the "
                f"replay, {event.value:#x} in the run"
            )
    device = board.device_of(event)
    if device is not None:
        board.journal.check_done(device, 0)


def _what(event: AccessEvent) -> str:
    direction = "write" if event.is_write else "read"
    cpu = "" if event.vcpu is None else f" by vCPU {event.vcpu}"
    return (
        f"{event.space} {direction} of {event.size} bytes at {event.address:#x}{cpu} "
        f"({event.time_ms / 1000:.3f} s)"
    )


def _discard(data: bytes) -> None:
    """Console output of a replay goes nowhere."""


def _nothing() -> None:
    """A replayed reset ends nothing: the recording ends where the run did."""


def _cannot_assign(device) -> None:
    raise KvmletError(f"the recording gives no BARs for PCI device {device.name}")
