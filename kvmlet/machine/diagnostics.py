"""What kvmlet tells a person about a guest: failing vCPU state, I/O traces, counters."""

from __future__ import annotations

import sys
from typing import TextIO

from kvmlet.bus import TraceHook
from kvmlet.errors import GuestMemoryError
from kvmlet.kvm import Vcpu
from kvmlet.machine.host_profile import instruction_address
from kvmlet.memory import GuestMemory

INSTRUCTION_BYTES = 16


def describe_vcpu(vcpu: Vcpu, memory: GuestMemory) -> str:
    """One line: the vCPU's main registers and the instruction bytes at RIP."""
    try:
        regs = vcpu.get_regs()
        sregs = vcpu.get_sregs()
    except Exception as error:  # the vCPU may be gone; say so rather than fail again
        return f"vCPU {vcpu.id} state unavailable ({error})"
    fields = [
        f"rip={regs.rip:#x}",
        f"rsp={regs.rsp:#x}",
        f"rflags={regs.rflags:#x}",
        f"rax={regs.rax:#x}",
        f"cr0={sregs.cr0:#x}",
        f"cr3={sregs.cr3:#x}",
        f"cr4={sregs.cr4:#x}",
        f"efer={sregs.efer:#x}",
        f"cs={sregs.cs.selector:#x}",
    ]
    code = "unreadable"
    address = instruction_address(vcpu, memory)
    if address is not None:
        try:
            code = memory.read(address, INSTRUCTION_BYTES).hex(" ")
        except GuestMemoryError:
            code = "outside RAM"
    return f"vCPU {vcpu.id}: {' '.join(fields)} code: {code}"


def trace_printer(stream: TextIO | None = None) -> TraceHook:
    """A bus trace hook printing one line per guest access (`--debug-io`) to `stream`
    (default: whatever sys.stderr is when the access happens)."""

    def trace(
        space: str, address: int, size: int, is_write: bool, value: int, region: str | None
    ) -> None:
        direction = "W" if is_write else "R"
        where = region or "unassigned"
        line = f"[io] {space:<6} {direction} {address:#010x}/{size} = {value:#x} {where}\n"
        (stream or sys.stderr).write(line)

    return trace


def format_stats(stats: dict) -> str:
    """The statistics dump as indented JSON (stable keys, for people and scripts)."""
    import json  # only when someone asks for statistics, not on every boot

    return json.dumps(stats, indent=2, sort_keys=True, default=str) + "\n"
