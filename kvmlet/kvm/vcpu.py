"""`Vcpu`: one virtual CPU: its `kvm_run` page, `run()` returning typed exits, and its state
(registers, special registers, FPU, MSRs, CPUID, local APIC, multiprocessor state, pending
events).

`run()` is the monitor's innermost loop: one KVM_RUN (`fcntl.ioctl` with no argument, which
releases the GIL) and a decode of the shared run page with precompiled `struct` layouts into a
preallocated exit object. Keep it that way: every exit pays for each step here, and
benchmarks/exit_cost.py shows it (docs/performance.md, "Exit cost").
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import mmap
import os
from collections.abc import Iterable, Mapping

from kvmlet.errors import KvmletError
from kvmlet.kvm import ioctls as nr
from kvmlet.kvm import structs as s
from kvmlet.kvm._syscall import failure, ioctl_int, ioctl_struct
from kvmlet.kvm.exits import (
    EXIT_UNION_OFFSET,
    INTERRUPTED,
    KVM_EXIT_IO,
    KVM_EXIT_IO_OUT,
    KVM_EXIT_MMIO,
    MMIO_DATA_OFFSET,
    MMIO_LAYOUT,
    REASON_AND_IO_LAYOUT,
    IoExit,
    MmioExit,
    VcpuExit,
    decode_rare_exit,
)

_KVM_RUN = nr.KVM_RUN
run_ioctl = fcntl.ioctl
"""What KVM_RUN goes through, `run_ioctl(vcpu.fd, KVM_RUN)` with no argument (cheapest from
Python); looked up on each call, so a benchmark can put a no-op here to time Python alone."""
_unpack_reason_and_io = REASON_AND_IO_LAYOUT.unpack_from
_IMMEDIATE_EXIT_OFFSET = s.KvmRun.immediate_exit.offset
_MAX_CPUID_ENTRIES = 256
PIO_DATA_OFFSET = mmap.PAGESIZE
"""KVM_PIO_PAGE_OFFSET: where KVM puts the data of a port I/O exit."""


class Vcpu:
    """A vCPU fd and its mapped run page; create it with `Vm.create_vcpu`."""

    def __init__(self, fd: int, vcpu_id: int, mmap_size: int):
        self.fd = fd
        self.id = vcpu_id
        self.cpuid: list[s.KvmCpuidEntry2] | None = None  # the table set_cpuid2 set
        try:
            self._mapping = mmap.mmap(fd, mmap_size, mmap.MAP_SHARED)
        except OSError as error:
            os.close(fd)
            raise KvmletError(f"cannot map the run page of vCPU {vcpu_id}: {error}") from None
        self.run_page = memoryview(self._mapping)
        self._io = IoExit()
        self._mmio = MmioExit()
        self.mmio_views = [
            self.run_page[MMIO_DATA_OFFSET : MMIO_DATA_OFFSET + size] for size in range(9)
        ]
        """Preallocated views of an MMIO exit's data, by size (0-8)."""
        self.pio_views = [
            self.run_page[PIO_DATA_OFFSET : PIO_DATA_OFFSET + size] for size in range(5)
        ]
        """Preallocated views of a single port access's data, by size (0-4)."""

    def run(self) -> VcpuExit:
        """Run the vCPU until it needs the monitor; return why (see kvmlet.kvm.exits)."""
        try:
            run_ioctl(self.fd, _KVM_RUN)
        except (InterruptedError, BlockingIOError):
            # EINTR: a signal or immediate_exit. EAGAIN: the first KVM_RUN of an application
            # processor (KVM_MP_STATE_UNINITIALIZED) sleeps until INIT arrives, then returns
            # EAGAIN; run it again to wait for SIPI (kvmtool and Firecracker do the same).
            return INTERRUPTED
        run = self.run_page
        reason, direction, size, port, count, offset = _unpack_reason_and_io(run)
        if reason == KVM_EXIT_IO:
            io = self._io
            io.port = port
            io.size = size
            io.is_write = direction == KVM_EXIT_IO_OUT
            io.count = count
            if count == 1 and offset == PIO_DATA_OFFSET:
                io.data = self.pio_views[size]
            else:
                io.data = run[offset : offset + size * count]
            return io
        if reason == KVM_EXIT_MMIO:
            address, size, is_write = MMIO_LAYOUT.unpack_from(run, EXIT_UNION_OFFSET)
            mmio = self._mmio
            mmio.address = address
            mmio.size = size
            mmio.is_write = is_write != 0
            mmio.data = self.mmio_views[size if size <= 8 else 8]
            return mmio
        return decode_rare_exit(run, reason)

    @property
    def immediate_exit(self) -> bool:
        """When set, KVM_RUN returns at once (InterruptedExit): set it, then signal the thread."""
        return self.run_page[_IMMEDIATE_EXIT_OFFSET] != 0

    @immediate_exit.setter
    def immediate_exit(self, value: bool) -> None:
        self.run_page[_IMMEDIATE_EXIT_OFFSET] = 1 if value else 0

    # -- state ------------------------------------------------------------------------------

    def get_regs(self) -> s.KvmRegs:
        return self._get("KVM_GET_REGS", nr.KVM_GET_REGS, s.KvmRegs())

    def set_regs(self, regs: s.KvmRegs) -> None:
        self._call("KVM_SET_REGS", nr.KVM_SET_REGS, regs)

    def get_sregs(self) -> s.KvmSregs:
        return self._get("KVM_GET_SREGS", nr.KVM_GET_SREGS, s.KvmSregs())

    def set_sregs(self, sregs: s.KvmSregs) -> None:
        self._call("KVM_SET_SREGS", nr.KVM_SET_SREGS, sregs)

    def get_fpu(self) -> s.KvmFpu:
        return self._get("KVM_GET_FPU", nr.KVM_GET_FPU, s.KvmFpu())

    def set_fpu(self, fpu: s.KvmFpu) -> None:
        self._call("KVM_SET_FPU", nr.KVM_SET_FPU, fpu)

    def get_lapic(self) -> s.KvmLapicState:
        return self._get("KVM_GET_LAPIC", nr.KVM_GET_LAPIC, s.KvmLapicState())

    def set_lapic(self, lapic: s.KvmLapicState) -> None:
        self._call("KVM_SET_LAPIC", nr.KVM_SET_LAPIC, lapic)

    def get_mp_state(self) -> int:
        """KVM_MP_STATE_*: an application processor starts UNINITIALIZED (waiting for INIT)."""
        return self._get("KVM_GET_MP_STATE", nr.KVM_GET_MP_STATE, s.KvmMpState()).mp_state

    def set_mp_state(self, mp_state: int) -> None:
        self._call("KVM_SET_MP_STATE", nr.KVM_SET_MP_STATE, s.KvmMpState(mp_state=mp_state))

    def get_vcpu_events(self) -> s.KvmVcpuEvents:
        return self._get("KVM_GET_VCPU_EVENTS", nr.KVM_GET_VCPU_EVENTS, s.KvmVcpuEvents())

    def set_vcpu_events(self, events: s.KvmVcpuEvents) -> None:
        self._call("KVM_SET_VCPU_EVENTS", nr.KVM_SET_VCPU_EVENTS, events)

    def get_msrs(self, indices: Iterable[int]) -> dict[int, int]:
        """Read MSRs; an index KVM cannot read is left out of the result."""
        wanted = list(indices)
        msrs = s.msrs_with(len(wanted))()
        msrs.header.nmsrs = len(wanted)
        for entry, index in zip(msrs.entries, wanted, strict=True):
            entry.index = index
        done = self._call("KVM_GET_MSRS", nr.KVM_GET_MSRS, msrs)
        return {entry.index: entry.data for entry in msrs.entries[:done]}

    def set_msrs(self, values: Mapping[int, int]) -> None:
        """Write MSRs; a KvmletError names the first one KVM refused."""
        items = list(values.items())
        msrs = s.msrs_with(len(items))()
        msrs.header.nmsrs = len(items)
        for entry, (index, data) in zip(msrs.entries, items, strict=True):
            entry.index = index
            entry.data = data
        done = self._call("KVM_SET_MSRS", nr.KVM_SET_MSRS, msrs)
        if done < len(items):
            raise KvmletError(f"KVM refused to set MSR {items[done][0]:#x} on vCPU {self.id}")

    def set_cpuid2(self, entries: Iterable[s.KvmCpuidEntry2]) -> None:
        """Set the vCPU's CPUID table; it is kept as `cpuid` (a snapshot saves it: some KVMs'
        KVM_GET_CPUID2 answers with another table than the one set)."""
        table = list(entries)
        cpuid = s.cpuid2_with(len(table))()
        cpuid.header.nent = len(table)
        for index, entry in enumerate(table):
            cpuid.entries[index] = entry
        self._call("KVM_SET_CPUID2", nr.KVM_SET_CPUID2, cpuid)
        self.cpuid = [s.KvmCpuidEntry2.from_buffer_copy(entry) for entry in table]

    def get_cpuid2(self) -> list[s.KvmCpuidEntry2]:
        cpuid = s.cpuid2_with(_MAX_CPUID_ENTRIES)()
        cpuid.header.nent = _MAX_CPUID_ENTRIES
        self._call("KVM_GET_CPUID2", nr.KVM_GET_CPUID2, cpuid)
        return [
            s.KvmCpuidEntry2.from_buffer_copy(entry) for entry in cpuid.entries[: cpuid.header.nent]
        ]

    def get_xsave(self, size: int = 0) -> bytes:
        """The XSAVE area: KVM_GET_XSAVE, or KVM_GET_XSAVE2 filling `size` bytes when the VM
        says its area is larger than 4 KiB (KVM_CHECK_EXTENSION(KVM_CAP_XSAVE2))."""
        if size <= ctypes.sizeof(s.KvmXsave):
            return bytes(self._get("KVM_GET_XSAVE", nr.KVM_GET_XSAVE, s.KvmXsave()))
        area = (ctypes.c_uint8 * size)()
        self._call("KVM_GET_XSAVE2", nr.KVM_GET_XSAVE2, area)
        return bytes(area)

    def set_xsave(self, area: bytes) -> None:
        """KVM_SET_XSAVE with an area `get_xsave` returned (at least 4 KiB)."""
        buffer = (ctypes.c_uint8 * max(len(area), ctypes.sizeof(s.KvmXsave))).from_buffer_copy(
            area.ljust(ctypes.sizeof(s.KvmXsave), b"\0")
        )
        self._call("KVM_SET_XSAVE", nr.KVM_SET_XSAVE, buffer)

    def get_xcrs(self) -> s.KvmXcrs:
        return self._get("KVM_GET_XCRS", nr.KVM_GET_XCRS, s.KvmXcrs())

    def set_xcrs(self, xcrs: s.KvmXcrs) -> None:
        self._call("KVM_SET_XCRS", nr.KVM_SET_XCRS, xcrs)

    def get_debugregs(self) -> s.KvmDebugregs:
        return self._get("KVM_GET_DEBUGREGS", nr.KVM_GET_DEBUGREGS, s.KvmDebugregs())

    def set_debugregs(self, debugregs: s.KvmDebugregs) -> None:
        self._call("KVM_SET_DEBUGREGS", nr.KVM_SET_DEBUGREGS, debugregs)

    def get_tsc_khz(self) -> int:
        """The guest's TSC frequency in kHz (KVM_GET_TSC_KHZ)."""
        try:
            return ioctl_int(self.fd, nr.KVM_GET_TSC_KHZ)
        except OSError as error:
            raise failure(f"KVM_GET_TSC_KHZ on vCPU {self.id}", error) from None

    def set_tsc_khz(self, khz: int) -> None:
        """Run the guest's TSC at `khz` (KVM_SET_TSC_KHZ: needs TSC scaling on the host for
        another frequency than the host's)."""
        try:
            ioctl_int(self.fd, nr.KVM_SET_TSC_KHZ, khz)
        except OSError as error:
            raise failure(f"KVM_SET_TSC_KHZ {khz} on vCPU {self.id}", error) from None

    def kvmclock_ctrl(self) -> bool:
        """KVM_KVMCLOCK_CTRL: tell the guest it was paused by the host (its soft-lockup
        watchdog then does not fire); False when the guest has no kvmclock page registered."""
        try:
            ioctl_int(self.fd, nr.KVM_KVMCLOCK_CTRL)
        except OSError as error:
            if error.errno == errno.EINVAL:
                return False
            raise failure(f"KVM_KVMCLOCK_CTRL on vCPU {self.id}", error) from None
        return True

    def _get(self, what: str, request: int, argument):
        self._call(what, request, argument)
        return argument

    def _call(self, what: str, request: int, argument: ctypes.Structure | ctypes.Array) -> int:
        try:
            return ioctl_struct(self.fd, request, argument)
        except OSError as error:
            raise failure(f"{what} on vCPU {self.id}", error) from None

    # -- lifetime ---------------------------------------------------------------------------

    def close(self) -> None:
        """Unmap the run page and close the fd (exit objects from run() become invalid)."""
        if self.fd < 0:
            return
        self._io.data = self._mmio.data = memoryview(b"")
        for view in (*self.mmio_views, *self.pio_views, self.run_page):
            view.release()
        self.mmio_views = self.pio_views = []
        # A caller may still hold a view of the run page: it is then unmapped when dropped.
        with contextlib.suppress(BufferError):
            self._mapping.close()
        os.close(self.fd)
        self.fd = -1

    def __enter__(self) -> Vcpu:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
