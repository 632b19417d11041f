"""What kvmlet tells a person about a vCPU that failed: its registers and the code at RIP."""

from __future__ import annotations

from kvmlet.errors import GuestMemoryError
from kvmlet.kvm import Vcpu
from kvmlet.memory import GuestMemory
from kvmlet.vstate.host_profile import instruction_address

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
