"""The pvm host profile on this machine's software KVM: the instruction emulator refuses
INT3 and FWAIT in guest kernel code (KVM_EXIT_INTERNAL_ERROR, emulation failure) and the
profile's fix-ups let a tiny CPL0 long-mode guest go on.

The guest runs from a higher-half mapping (as a Linux kernel does) so the fix-up has to
translate RIP through the guest's page tables; the #BP handler reports the return address
the CPU pushed, proving the breakpoint was delivered after INT3 as on hardware.
"""

from __future__ import annotations

import struct

import pytest

from kvmlet.boot.x86_64 import BootCpuState
from kvmlet.kvm import InternalErrorExit, IoExit
from kvmlet.vstate import cpu, host_profile
from tests.helpers.long_mode_vm import GDT, GDT_LIMIT, HIGHER_HALF, PML4, long_mode_vm

pytestmark = pytest.mark.pvm

IDT = 0x3000
CODE, BP_HANDLER, STACK_TOP = 0x1000, 0x2000, 0x8000


def idt_gate(handler: int, selector: int = 0x10) -> bytes:
    """A 64-bit interrupt gate (present, DPL 0, type 0xE)."""
    return struct.pack(
        "<HHBBHII", handler & 0xFFFF, selector, 0, 0x8E, (handler >> 16) & 0xFFFF, handler >> 32, 0
    )


@pytest.fixture
def guest():
    if not host_profile.is_software_kvm():
        pytest.skip("this host's KVM is not the software PVM KVM")
    with long_mode_vm(watchdog_seconds=3.0) as vm:
        yield breakpoint_guest(vm)


def breakpoint_guest(vm):
    """Install the #BP handler; return `start(code)`, which runs `code` from the higher half."""
    kvm, vcpu, memory = vm.kvm, vm.vcpu, vm.memory
    memory.write(IDT + 3 * 16, idt_gate(BP_HANDLER))
    memory.write(
        BP_HANDLER,
        bytes.fromhex("488b0424")  # mov rax, [rsp]   (return RIP pushed by the CPU)
        + bytes.fromhex("e713")  # out 0x13, eax
        + bytes.fromhex("48c1e820")  # shr rax, 32
        + bytes.fromhex("e713"),  # out 0x13, eax
    )
    cpu.configure_vcpu(vcpu, kvm.supported_cpuid(), 1, host_profile.PVM.cpuid_masks)

    def start(code: bytes):
        memory.write(CODE, code)
        entry = HIGHER_HALF + CODE
        state = BootCpuState("long64", entry, cr3=PML4, gdt_base=GDT, gdt_limit=GDT_LIMIT)
        cpu.apply_boot_state(vcpu, state)
        sregs = vcpu.get_sregs()
        sregs.idt.base = IDT
        sregs.idt.limit = 16 * 4 - 1
        vcpu.set_sregs(sregs)
        regs = vcpu.get_regs()
        regs.rsp = STACK_TOP
        vcpu.set_regs(regs)
        return vcpu, memory

    return start


def run_with_profile(vcpu, memory, profile, limit=8):
    """Run until an I/O exit, letting `profile` fix emulation failures; return the exit."""
    for _ in range(limit):
        exit = vcpu.run()
        if isinstance(exit, InternalErrorExit) and profile.handle_emulation_failure(
            vcpu, memory, exit
        ):
            continue
        return exit
    raise AssertionError("the guest kept failing")


def test_this_emulator_refuses_int3_in_kernel_code(guest):
    vcpu, memory = guest(bytes.fromhex("cc"))  # int3
    exit = vcpu.run()
    assert isinstance(exit, InternalErrorExit) and exit.is_emulation_failure
    assert exit.instruction_bytes[:1] == b"\xcc"
    assert not host_profile.NONE.handle_emulation_failure(vcpu, memory, exit)


def test_int3_fixup_delivers_breakpoint_after_the_instruction(guest):
    vcpu, memory = guest(bytes.fromhex("cc"))  # int3
    low = run_with_profile(vcpu, memory, host_profile.PVM)
    assert isinstance(low, IoExit) and low.port == 0x13
    pushed = int.from_bytes(low.data, "little")
    high = run_with_profile(vcpu, memory, host_profile.PVM)
    pushed |= int.from_bytes(high.data, "little") << 32
    assert pushed == HIGHER_HALF + CODE + 1


def test_fwait_is_refused_then_skipped(guest):
    vcpu, memory = guest(
        bytes.fromhex("9b")  # fwait
        + bytes.fromhex("b042")  # mov al, 0x42
        + bytes.fromhex("e610")  # out 0x10, al
    )
    exit = vcpu.run()
    assert isinstance(exit, InternalErrorExit) and exit.instruction_bytes[:1] == b"\x9b"
    assert host_profile.PVM.handle_emulation_failure(vcpu, memory, exit)
    exit = run_with_profile(vcpu, memory, host_profile.PVM)
    assert isinstance(exit, IoExit) and (exit.port, bytes(exit.data)) == (0x10, b"\x42")
