"""The record file of `kvmlet run --record`: every user-space access and what devices did.

Layout (all integers little-endian):

    magic    8 bytes  b"KVMLREC1"
    header   u32 length, then that many bytes of UTF-8 JSON (the machine: memory, devices...)
    events   one after another, each a kind byte and a fixed part, some with trailing bytes

    kind  event      fixed part after the kind byte                    then
    1     NAME       u16 id, u16 length                                the name (UTF-8)
    2     ACCESS     u8 flags, u16 region, u16 vcpu, u32 time ms,
                     u64 address, u64 value
    3     CLOCK      u16 device, u32 job, f64 seconds
    4     DMA_READ   u16 device, u32 job, u64 address, u32 length,     the bytes read
                     u8 failed
    5     DMA_WRITE  (as DMA_READ)                                     the bytes written
    6     IRQ        u16 device, u32 job, u8 kind, u16 value
    7     DONE       u16 device, u32 job
    8     INPUT      u16 device, u32 length                            the bytes
    9     DEVICE     u32 length                                        JSON: a device added

Names (regions and devices) are numbered by NAME events that come before their first use;
region 0xFFFF is "unassigned", vCPU 0xFFFF "not a vCPU". ACCESS flags: bit 0 write, bit 1 MMIO
(else port I/O), bits 4-7 the width in bytes; `value` is what the guest wrote or what the
device answered; `time` counts milliseconds from the start of the recording. A DMA event with
`failed` set was refused as outside guest RAM (no bytes follow a failed read). IRQ kinds: 0 a
line set to `value`, 1 a pulse, 2 an MSI of vector `value`. `job` 0 means "inside a register
access"; other numbers are a device worker's jobs, counted from 1 per device.
"""

from __future__ import annotations

import json
import struct
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, BinaryIO, NamedTuple

from kvmlet.errors import KvmletError

MAGIC = b"KVMLREC1"
NO_NAME = 0xFFFF
NO_VCPU = 0xFFFF
NAME, ACCESS, CLOCK, DMA_READ, DMA_WRITE, IRQ, DONE, INPUT, DEVICE = range(1, 10)
IRQ_LEVEL, IRQ_PULSE, IRQ_MSI = range(3)
FLAG_WRITE = 1 << 0
FLAG_MMIO = 1 << 1

_LENGTH = struct.Struct("<I")
_FIXED = {
    NAME: struct.Struct("<HH"),
    ACCESS: struct.Struct("<BHHIQQ"),
    CLOCK: struct.Struct("<HId"),
    DMA_READ: struct.Struct("<HIQIB"),
    DMA_WRITE: struct.Struct("<HIQIB"),
    IRQ: struct.Struct("<HIBH"),
    DONE: struct.Struct("<HI"),
    INPUT: struct.Struct("<HI"),
    DEVICE: struct.Struct("<I"),
}
_ACCESS_RECORD = struct.Struct("<BBHHIQQ")


class AccessEvent(NamedTuple):
    space: str  # "io" or "memory"
    address: int
    size: int
    is_write: bool
    value: int
    region: str | None
    vcpu: int | None
    time_ms: int


class ClockEvent(NamedTuple):
    device: str
    job: int
    value: float


class DmaEvent(NamedTuple):
    is_write: bool
    device: str
    job: int
    address: int
    length: int
    data: bytes | None  # None: refused (outside guest RAM)


class IrqEvent(NamedTuple):
    device: str
    job: int
    kind: int
    value: int


class DoneEvent(NamedTuple):
    device: str
    job: int


class InputEvent(NamedTuple):
    device: str
    data: bytes


class DeviceEvent(NamedTuple):
    spec: dict


Event = AccessEvent | ClockEvent | DmaEvent | IrqEvent | DoneEvent | InputEvent | DeviceEvent


class JournalWriter:
    """Appends events to an open binary file; safe to call from any thread.

    Each event is one `write` of the (buffered) file, which the file serialises, so events
    keep the order of their calls without a lock of ours; only numbering a new name takes
    one (its NAME event is written before any event can use the number). The header is
    written by `begin` (a machine knows it once its devices are placed); what happens before
    waits in memory and follows the header. `events` counts events (approximately, when
    several threads record at once)."""

    def __init__(self, file: BinaryIO):
        self.file = file
        self.events = 0
        self._names: dict[str | None, int] = {None: NO_NAME}
        self._lock = threading.Lock()
        self._start = time.monotonic_ns()
        self._early: bytearray | None = bytearray()
        self._write: Callable[[bytes], Any] = self._early.extend

    @property
    def begun(self) -> bool:
        """Whether the header is written."""
        return self._early is None

    def begin(self, header: dict[str, Any]) -> None:
        """Write the magic and the header, then the events recorded so far."""
        encoded = json.dumps(header, sort_keys=True).encode()
        with self._lock:
            self.file.write(MAGIC + _LENGTH.pack(len(encoded)) + encoded)
            if self._early:
                self.file.write(self._early)
            self._early = None
            self._write = self.file.write

    def _number(self, name: str) -> int:
        """Number a new name, writing its NAME event before publishing the number."""
        with self._lock:
            number = self._names.get(name)
            if number is None:
                number = len(self._names) - 1
                if number >= NO_NAME:
                    raise KvmletError("the recording has more names than its format can number")
                encoded = name.encode()
                self._write(bytes([NAME]) + _FIXED[NAME].pack(number, len(encoded)) + encoded)
                self._names[name] = number
            return number

    def access(
        self,
        mmio: bool,
        address: int,
        size: int,
        is_write: bool,
        value: int,
        region: str | None,
        vcpu: int | None,
    ) -> None:
        number = self._names.get(region)
        if number is None:
            number = self._number(region)
        self._write(
            _ACCESS_RECORD.pack(
                ACCESS,
                (FLAG_WRITE if is_write else 0) | (FLAG_MMIO if mmio else 0) | size << 4,
                number,
                NO_VCPU if vcpu is None else vcpu,
                (time.monotonic_ns() - self._start) // 1_000_000 & 0xFFFF_FFFF,
                address & 0xFFFF_FFFF_FFFF_FFFF,
                value,
            )
        )
        self.events += 1

    def _event(self, kind: int, *fields: Any, device: str | None = None, tail: bytes = b""):
        prefix = ()
        if device is not None:
            number = self._names.get(device)
            prefix = (self._number(device) if number is None else number,)
        self._write(bytes([kind]) + _FIXED[kind].pack(*prefix, *fields) + tail)
        self.events += 1

    def clock(self, device: str, job: int, value: float) -> None:
        self._event(CLOCK, job, value, device=device)

    def dma(
        self, is_write: bool, device: str, job: int, address: int, length: int, data: bytes | None
    ) -> None:
        kind = DMA_WRITE if is_write else DMA_READ
        failed = data is None
        tail = b"" if failed else bytes(data)
        self._event(kind, job, address, length, int(failed), device=device, tail=tail)

    def irq(self, device: str, job: int, kind: int, value: int) -> None:
        self._event(IRQ, job, kind, value, device=device)

    def done(self, device: str, job: int) -> None:
        self._event(DONE, job, device=device)

    def input(self, device: str, data: bytes) -> None:
        self._event(INPUT, len(data), device=device, tail=bytes(data))

    def device_added(self, spec: dict) -> None:
        encoded = json.dumps(spec, sort_keys=True).encode()
        self._event(DEVICE, len(encoded), tail=encoded)

    def flush(self) -> None:
        with self._lock:
            self.file.flush()


class JournalReader:
    """Reads a record file: `header`, then `events()` in order. Every defect of the file (it
    may come from anywhere) is one KvmletError naming the byte where it was found."""

    def __init__(self, data: bytes, name: str = "record file"):
        self.data = data
        self.name = name
        if data[: len(MAGIC)] != MAGIC:
            raise KvmletError(f"{name} is not a kvmlet recording (no {MAGIC.decode()} magic)")
        (length,) = self._unpack(_LENGTH, len(MAGIC))
        start = len(MAGIC) + _LENGTH.size
        raw = self._take(start, length)
        try:
            header = json.loads(raw)
        except (UnicodeDecodeError, ValueError):
            raise KvmletError(f"{name}: its header is not JSON") from None
        if not isinstance(header, dict):
            raise KvmletError(f"{name}: its header is not a JSON object")
        self.header: dict = header
        self.events_offset = start + length

    def _unpack(self, layout: struct.Struct, offset: int) -> tuple:
        if offset + layout.size > len(self.data):
            raise KvmletError(f"{self.name} is cut short at byte {offset}")
        return layout.unpack_from(self.data, offset)

    def _take(self, offset: int, length: int) -> bytes:
        if offset + length > len(self.data):
            raise KvmletError(f"{self.name} is cut short at byte {offset}")
        return self.data[offset : offset + length]

    def events(self) -> Iterator[Event]:
        names: dict[int, str] = {}
        offset = self.events_offset
        data = self.data

        def name_of(number: int, allow_none: bool = False) -> str | None:
            if number == NO_NAME and allow_none:
                return None
            if number not in names:
                raise KvmletError(f"{self.name}: byte {offset} uses name {number} before its NAME")
            return names[number]

        while offset < len(data):
            kind = data[offset]
            layout = _FIXED.get(kind)
            if layout is None:
                raise KvmletError(f"{self.name}: unknown event kind {kind} at byte {offset}")
            fields = self._unpack(layout, offset + 1)
            body = offset + 1 + layout.size
            if kind == NAME:
                number, length = fields
                try:
                    names[number] = self._take(body, length).decode()
                except UnicodeDecodeError:
                    raise KvmletError(f"{self.name}: name at byte {offset} is not UTF-8") from None
                offset = body + length
                continue
            tail = 0
            if kind == ACCESS:
                flags, region, vcpu, elapsed, address, value = fields
                size = flags >> 4
                if size not in (1, 2, 4, 8):
                    raise KvmletError(f"{self.name}: access width {size} at byte {offset}")
                event: Event = AccessEvent(
                    "memory" if flags & FLAG_MMIO else "io",
                    address,
                    size,
                    bool(flags & FLAG_WRITE),
                    value & ((1 << (8 * size)) - 1),
                    name_of(region, allow_none=True),
                    None if vcpu == NO_VCPU else vcpu,
                    elapsed,
                )
            elif kind == CLOCK:
                event = ClockEvent(name_of(fields[0]), fields[1], fields[2])
            elif kind in (DMA_READ, DMA_WRITE):
                device, job, address, length, failed = fields
                tail = 0 if failed else length
                payload = None if failed else self._take(body, length)
                event = DmaEvent(kind == DMA_WRITE, name_of(device), job, address, length, payload)
            elif kind == IRQ:
                device, job, irq_kind, value = fields
                event = IrqEvent(name_of(device), job, irq_kind, value)
            elif kind == DONE:
                event = DoneEvent(name_of(fields[0]), fields[1])
            elif kind == INPUT:
                tail = fields[1]
                event = InputEvent(name_of(fields[0]), self._take(body, tail))
            else:
                tail = fields[0]
                try:
                    spec = json.loads(self._take(body, tail))
                except (UnicodeDecodeError, ValueError):
                    raise KvmletError(f"{self.name}: device at byte {offset} is not JSON") from None
                if not isinstance(spec, dict):
                    raise KvmletError(f"{self.name}: device at byte {offset} is not an object")
                event = DeviceEvent(spec)
            offset = body + tail
            yield event
