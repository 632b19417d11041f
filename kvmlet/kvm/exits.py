"""Typed vCPU exits: what `Vcpu.run()` returns, decoded from the shared `kvm_run` page.

The two hot exits, port I/O and MMIO, are preallocated per vCPU and updated in place by
`run()` (no allocation per exit beyond the data view): an `IoExit`/`MmioExit` and its `data`
view are valid only until the vCPU runs again, the same lifetime the kernel gives the bytes
in the run page. Reply to an IN or an MMIO read by writing into `data` before the next run().
Rare exits are small immutable values decoded by `decode_rare_exit`: NamedTuples, or one shared
instance of a class for the exits that carry nothing: building a frozen dataclass at import
costs more of every boot's set-up than values made a handful of times per run are worth
(docs/performance.md, "Boot").
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from kvmlet.kvm import structs as s

KVM_EXIT_UNKNOWN = 0
KVM_EXIT_IO = 2
KVM_EXIT_HLT = 5
KVM_EXIT_MMIO = 6
KVM_EXIT_SHUTDOWN = 8
KVM_EXIT_FAIL_ENTRY = 9
KVM_EXIT_INTR = 10
KVM_EXIT_INTERNAL_ERROR = 17
KVM_EXIT_SYSTEM_EVENT = 24

KVM_EXIT_IO_OUT = 1

KVM_INTERNAL_ERROR_EMULATION = 1
KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES = 1

KVM_SYSTEM_EVENT_SHUTDOWN = 1
KVM_SYSTEM_EVENT_RESET = 2
KVM_SYSTEM_EVENT_CRASH = 3

EXIT_UNION_OFFSET = s.KvmRun.exit.offset
EXIT_REASON_OFFSET = s.KvmRun.exit_reason.offset

IO_LAYOUT = struct.Struct("<BBHIQ")
"""direction, size, port, count, data_offset: `kvm_run.io`."""
REASON_AND_IO_LAYOUT = struct.Struct(
    f"<{EXIT_REASON_OFFSET}xI{EXIT_UNION_OFFSET - EXIT_REASON_OFFSET - 4}xBBHIQ"
)
"""exit_reason followed by the `kvm_run.io` fields: the hot path reads both in one call."""
MMIO_LAYOUT = struct.Struct("<Q8xIB")
"""phys_addr, (data), len, is_write: `kvm_run.mmio`."""
MMIO_DATA_OFFSET = EXIT_UNION_OFFSET + s.RunMmio.data.offset
_EXIT_HEADER = struct.Struct("<II")
_FAIL_ENTRY = struct.Struct("<QI")

assert IO_LAYOUT.size == 16 and s.RunIo.data_offset.offset == 8
assert s.RunMmio.len.offset == 16 and s.RunMmio.is_write.offset == 20


class IoExit:
    """A guest IN/OUT (`count` > 1 for string I/O); `data` is `size * count` bytes."""

    __slots__ = ("count", "data", "is_write", "port", "size")
    __match_args__ = ("port", "size", "is_write", "count", "data")

    def __init__(self) -> None:
        self.port = self.size = self.count = 0
        self.is_write = False
        self.data = memoryview(b"")

    def __repr__(self) -> str:
        kind = "out" if self.is_write else "in"
        return f"IoExit({kind} port={self.port:#x} size={self.size} count={self.count})"


class MmioExit:
    """A guest access to guest-physical memory no slot backs; `data` is `size` bytes."""

    __slots__ = ("address", "data", "is_write", "size")
    __match_args__ = ("address", "size", "is_write", "data")

    def __init__(self) -> None:
        self.address = self.size = 0
        self.is_write = False
        self.data = memoryview(b"")

    def __repr__(self) -> str:
        kind = "write" if self.is_write else "read"
        return f"MmioExit({kind} address={self.address:#x} size={self.size})"


class _FieldlessExit:
    """An exit that carries nothing: `run()` returns one shared instance of each kind."""

    __slots__ = ()

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class HltExit(_FieldlessExit):
    """The guest executed HLT (only without the in-kernel irqchip)."""

    __slots__ = ()


class ShutdownExit(_FieldlessExit):
    """The vCPU shut down (a triple fault, or a reset the guest forced that way)."""

    __slots__ = ()


class InterruptedExit(_FieldlessExit):
    """KVM_RUN returned early (EINTR or `immediate_exit`): a signal asked the vCPU to stop."""

    __slots__ = ()


class SystemEventExit(NamedTuple):
    """A platform event: `kind` is KVM_SYSTEM_EVENT_SHUTDOWN, _RESET, _CRASH, ..."""

    kind: int
    data: tuple[int, ...] = ()


class InternalErrorExit(NamedTuple):
    """KVM could not go on (suberror 1: the instruction emulator refused an instruction)."""

    suberror: int
    data: tuple[int, ...] = ()

    @property
    def is_emulation_failure(self) -> bool:
        return self.suberror == KVM_INTERNAL_ERROR_EMULATION

    @property
    def instruction_bytes(self) -> bytes:
        """The failing instruction's bytes when KVM reported them, else b""."""
        if not self.is_emulation_failure or len(self.data) < 3:
            return b""
        if not self.data[0] & KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES:
            return b""
        raw = struct.pack("<QQ", self.data[1], self.data[2])
        return raw[1 : 1 + min(raw[0], 15)]


class FailEntryExit(NamedTuple):
    """The hardware refused to enter the guest; `reason` is the hardware's code."""

    reason: int
    cpu: int = 0


class OtherExit(NamedTuple):
    """An exit reason kvmlet does not act on (reported, never silently ignored)."""

    reason: int


HLT = HltExit()
SHUTDOWN = ShutdownExit()
INTERRUPTED = InterruptedExit()

VcpuExit = (
    IoExit
    | MmioExit
    | HltExit
    | ShutdownExit
    | InterruptedExit
    | SystemEventExit
    | InternalErrorExit
    | FailEntryExit
    | OtherExit
)


def _u64s(run: memoryview, offset: int, count: int) -> tuple[int, ...]:
    count = min(count, 16)
    return struct.unpack_from(f"<{count}Q", run, offset)


def decode_rare_exit(run: memoryview, reason: int) -> VcpuExit:
    """Decode every exit but I/O and MMIO from the run page (`run` is the whole page)."""
    union = EXIT_UNION_OFFSET
    if reason == KVM_EXIT_HLT:
        return HLT
    if reason == KVM_EXIT_SHUTDOWN:
        return SHUTDOWN
    if reason == KVM_EXIT_INTR:
        return INTERRUPTED
    if reason == KVM_EXIT_SYSTEM_EVENT:
        kind, ndata = _EXIT_HEADER.unpack_from(run, union)
        return SystemEventExit(kind, _u64s(run, union + 8, ndata))
    if reason == KVM_EXIT_INTERNAL_ERROR:
        suberror, ndata = _EXIT_HEADER.unpack_from(run, union)
        return InternalErrorExit(suberror, _u64s(run, union + 8, ndata))
    if reason == KVM_EXIT_FAIL_ENTRY:
        hardware_reason, cpu = _FAIL_ENTRY.unpack_from(run, union)
        return FailEntryExit(hardware_reason, cpu)
    return OtherExit(reason)
