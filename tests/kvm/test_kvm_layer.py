"""The KVM layer on /dev/kvm with tiny real-mode guests of our own (a few bytes each).

Each guest is hand-assembled machine code with its assembly in comments, loaded at 0x1000 in
a 64 KiB RAM slot and run through `Vcpu.run()` with a minimal loop in the test. A SIGALRM
watchdog turns a guest that never exits into an InterruptedExit, so no test can hang.
"""

from __future__ import annotations

import os
import select
import signal
import threading
import time

import pytest

from kvmlet.errors import KvmletError
from kvmlet.kvm import (
    HltExit,
    InterruptedExit,
    IoExit,
    IrqchipRoute,
    Kvm,
    MmioExit,
    MsiRoute,
)
from kvmlet.memory import GuestMemory

pytestmark = pytest.mark.kvm

RAM_SIZE = 0x10000
CODE = 0x1000
UNMAPPED = 0x20000  # real-mode segment 0x2000: above the RAM slot


@pytest.fixture
def watchdog():
    """SIGALRM after 2 s interrupts a stuck KVM_RUN (the handler itself does nothing)."""
    previous = signal.signal(signal.SIGALRM, lambda *_: None)
    signal.setitimer(signal.ITIMER_REAL, 2.0)
    yield
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGALRM, previous)


@pytest.fixture
def kvm():
    with Kvm() as kvm:
        yield kvm


class RealModeGuest:
    """A VM with 64 KiB of RAM and one vCPU starting in real mode at CS:IP = 0:0x1000."""

    def __init__(self, kvm: Kvm, code: bytes, *, irqchip: bool = True):
        self.vm = kvm.create_vm()
        if irqchip:
            self.vm.setup_x86_platform()
        self.memory = GuestMemory.anonymous([(0, RAM_SIZE)])
        bank = self.memory.banks[0]
        self.vm.add_memory(0, RAM_SIZE, bank.host_address())
        self.memory.write(CODE, code)
        self.vcpu = self.vm.create_vcpu(0)
        sregs = self.vcpu.get_sregs()
        sregs.cs.base = 0
        sregs.cs.selector = 0
        self.vcpu.set_sregs(sregs)
        regs = self.vcpu.get_regs()
        regs.rip = CODE
        regs.rflags = 2
        self.vcpu.set_regs(regs)

    def close(self):
        self.vcpu.close()
        self.vm.close()
        self.memory.close()


@pytest.fixture
def guest(kvm, watchdog):
    made = []

    def make(code: bytes, **options) -> RealModeGuest:
        made.append(RealModeGuest(kvm, code, **options))
        return made[-1]

    yield make
    for each in made:
        each.close()


def test_required_capabilities_cpuid_and_msr_list(kvm):
    kvm.require()
    assert any(entry.function == 0 for entry in kvm.supported_cpuid())
    assert len(kvm.msr_index_list()) > 0
    assert kvm.vcpu_mmap_size() >= 4096


def test_a_missing_capability_is_named(kvm):
    with pytest.raises(KvmletError, match=r"lacks a capability kvmlet needs: KVM_CAP_9999"):
        kvm.require([9999])


def test_out_gives_port_size_and_data(guest):
    g = guest(
        bytes.fromhex("b042")  # mov al, 0x42
        + bytes.fromhex("e610")  # out 0x10, al
        + bytes.fromhex("baf803")  # mov dx, 0x3f8
        + bytes.fromhex("b83412")  # mov ax, 0x1234
        + bytes.fromhex("ef")  # out dx, ax
    )
    exit = g.vcpu.run()
    assert isinstance(exit, IoExit)
    assert (exit.port, exit.size, exit.is_write, exit.count) == (0x10, 1, True, 1)
    assert bytes(exit.data) == b"\x42"
    exit = g.vcpu.run()
    assert (exit.port, exit.size, exit.is_write, bytes(exit.data)) == (0x3F8, 2, True, b"\x34\x12")


def test_in_receives_the_bytes_written_into_the_run_page(guest):
    g = guest(
        bytes.fromhex("e410")  # in al, 0x10
        + bytes.fromhex("e611")  # out 0x11, al
    )
    exit = g.vcpu.run()
    assert isinstance(exit, IoExit)
    assert (exit.port, exit.size, exit.is_write) == (0x10, 1, False)
    exit.data[0] = 0x77
    exit = g.vcpu.run()
    assert (exit.port, bytes(exit.data)) == (0x11, b"\x77")


def test_mmio_write_and_read_outside_ram(guest):
    g = guest(
        bytes.fromhex("b80020")  # mov ax, 0x2000
        + bytes.fromhex("8ed8")  # mov ds, ax
        + bytes.fromhex("c60610005a")  # mov byte [0x10], 0x5a
        + bytes.fromhex("a12000")  # mov ax, [0x20]
        + bytes.fromhex("e712")  # out 0x12, ax
    )
    exit = g.vcpu.run()
    assert isinstance(exit, MmioExit)
    assert (exit.address, exit.size, exit.is_write, bytes(exit.data)) == (
        UNMAPPED + 0x10,
        1,
        True,
        b"\x5a",
    )
    exit = g.vcpu.run()
    assert isinstance(exit, MmioExit)
    assert (exit.address, exit.size, exit.is_write) == (UNMAPPED + 0x20, 2, False)
    exit.data[:] = b"\xcd\xab"
    exit = g.vcpu.run()
    assert (exit.port, bytes(exit.data)) == (0x12, b"\xcd\xab")


def test_readonly_slot_turns_writes_into_mmio_exits(guest):
    g = guest(
        bytes.fromhex("b80020")  # mov ax, 0x2000
        + bytes.fromhex("8ed8")  # mov ds, ax
        + bytes.fromhex("a00000")  # mov al, [0]
        + bytes.fromhex("e610")  # out 0x10, al
        + bytes.fromhex("c606000099")  # mov byte [0], 0x99
    )
    rom = GuestMemory.anonymous([(UNMAPPED, 0x1000)])
    rom.write_u8(UNMAPPED, 0x3C)
    g.vm.add_memory(UNMAPPED, 0x1000, rom.banks[0].host_address(), readonly=True)
    exit = g.vcpu.run()
    assert (exit.port, bytes(exit.data)) == (0x10, b"\x3c")  # reads come from the slot
    exit = g.vcpu.run()
    assert isinstance(exit, MmioExit)
    assert (exit.address, exit.is_write, bytes(exit.data)) == (UNMAPPED, True, b"\x99")
    assert rom.read_u8(UNMAPPED) == 0x3C


def test_removed_slot_becomes_mmio(guest):
    g = guest(
        bytes.fromhex("b80020")  # mov ax, 0x2000
        + bytes.fromhex("8ed8")  # mov ds, ax
        + bytes.fromhex("a00000")  # mov al, [0]
    )
    extra = GuestMemory.anonymous([(UNMAPPED, 0x1000)])
    slot = g.vm.add_memory(UNMAPPED, 0x1000, extra.banks[0].host_address())
    g.vm.remove_memory(slot.slot)
    exit = g.vcpu.run()
    assert isinstance(exit, MmioExit) and exit.address == UNMAPPED


def test_hlt_exits_without_irqchip(guest):
    g = guest(bytes.fromhex("f4"), irqchip=False)  # hlt
    assert isinstance(g.vcpu.run(), HltExit)
    assert g.vcpu.get_regs().rip == CODE + 1


def test_hlt_stays_in_kernel_with_irqchip_until_a_signal(guest):
    g = guest(bytes.fromhex("faf4"))  # cli; hlt
    main = threading.get_ident()
    timer = threading.Timer(0.1, signal.pthread_kill, (main, signal.SIGALRM))
    started = time.monotonic()
    timer.start()
    exit = g.vcpu.run()
    timer.join()
    assert isinstance(exit, InterruptedExit)
    assert time.monotonic() - started >= 0.09


def test_immediate_exit_returns_before_running_the_guest(guest):
    g = guest(bytes.fromhex("e610"))  # out 0x10, al
    g.vcpu.immediate_exit = True
    assert g.vcpu.immediate_exit
    assert isinstance(g.vcpu.run(), InterruptedExit)
    assert g.vcpu.get_regs().rip == CODE
    g.vcpu.immediate_exit = False
    assert g.vcpu.run().port == 0x10


def readable(fd: int) -> bool:
    return bool(select.select([fd], [], [], 0)[0])


def test_ioeventfd_pio_write_signals_without_an_exit(guest):
    g = guest(
        bytes.fromhex("b042")  # mov al, 0x42
        + bytes.fromhex("e610")  # out 0x10, al   (ioeventfd: no exit)
        + bytes.fromhex("e611")  # out 0x11, al
    )
    event = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    try:
        g.vm.assign_ioeventfd(event, 0x10, 1, pio=True)
        exit = g.vcpu.run()
        assert exit.port == 0x11
        assert readable(event) and os.eventfd_read(event) == 1
        g.vm.deassign_ioeventfd(event, 0x10, 1, pio=True)
    finally:
        os.close(event)


def test_ioeventfd_datamatch_and_mmio(guest):
    g = guest(
        bytes.fromhex("b043")  # mov al, 0x43
        + bytes.fromhex("e610")  # out 0x10, al   (datamatch 0x42: exits)
        + bytes.fromhex("b80020")  # mov ax, 0x2000
        + bytes.fromhex("8ed8")  # mov ds, ax
        + bytes.fromhex("c706040001 00")  # mov word [4], 1   (MMIO ioeventfd: no exit)
        + bytes.fromhex("e611")  # out 0x11, al
    )
    port_event = os.eventfd(0, os.EFD_NONBLOCK)
    mmio_event = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        g.vm.assign_ioeventfd(port_event, 0x10, 1, pio=True, datamatch=0x42)
        g.vm.assign_ioeventfd(mmio_event, UNMAPPED + 4, 2, pio=False)
        exit = g.vcpu.run()
        assert (exit.port, bytes(exit.data)) == (0x10, b"\x43")
        assert not readable(port_event)
        exit = g.vcpu.run()
        assert isinstance(exit, IoExit) and exit.port == 0x11
        assert readable(mmio_event)
    finally:
        os.close(port_event)
        os.close(mmio_event)


def test_irqfd_assign_resample_and_deassign(guest):
    g = guest(bytes.fromhex("f4"))
    trigger = os.eventfd(0, os.EFD_NONBLOCK)
    resample = os.eventfd(0, os.EFD_NONBLOCK)
    other = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        g.vm.assign_irqfd(trigger, 5)
        with pytest.raises(KvmletError, match="KVM_IRQFD"):
            g.vm.assign_irqfd(trigger, 5)  # the same eventfd twice: EBUSY
        g.vm.assign_irqfd(other, 10, resample_fd=resample)
        os.eventfd_write(trigger, 1)
        g.vm.deassign_irqfd(trigger, 5)
        g.vm.deassign_irqfd(other, 10)
        g.vm.assign_irqfd(trigger, 5)  # free again after deassignment
    finally:
        for fd in (trigger, resample, other):
            os.close(fd)


def test_gsi_routing_irq_line_and_msi(guest):
    g = guest(bytes.fromhex("f4"))
    routes = [IrqchipRoute(gsi, 2, gsi) for gsi in range(24)]
    routes += [IrqchipRoute(gsi, 0, gsi) for gsi in range(8)]
    routes.append(MsiRoute(24, 0xFEE0_0000, 0x41))
    g.vm.set_gsi_routing(routes)
    event = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        g.vm.assign_irqfd(event, 24)
    finally:
        os.close(event)
    g.vm.irq_line(4, True)
    g.vm.irq_line(4, False)
    assert isinstance(g.vm.signal_msi(0xFEE0_0000, 0x41), bool)


def test_vcpu_state_round_trips(guest):
    g = guest(bytes.fromhex("f4"))
    regs = g.vcpu.get_regs()
    regs.rbx = 0x1234_5678
    g.vcpu.set_regs(regs)
    assert g.vcpu.get_regs().rbx == 0x1234_5678
    fpu = g.vcpu.get_fpu()
    fpu.fcw = 0x27F
    fpu.fsw = 0x0100
    g.vcpu.set_fpu(fpu)
    assert (g.vcpu.get_fpu().fcw, g.vcpu.get_fpu().fsw) == (0x27F, 0x0100)
    events = g.vcpu.get_vcpu_events()
    g.vcpu.set_vcpu_events(events)
    assert bytes(g.vcpu.get_lapic()) != bytes(1024)
    with pytest.raises(KvmletError, match="KVM refused to set MSR 0x12345678"):
        g.vcpu.set_msrs({0x1234_5678: 1})


PIC_GUEST = (
    bytes.fromhex("fa")  # cli
    + bytes.fromhex("b011e620")  # mov al, 0x11; out 0x20, al   (ICW1: init, ICW4 follows)
    + bytes.fromhex("b008e621")  # mov al, 0x08; out 0x21, al   (ICW2: vectors 8..15)
    + bytes.fromhex("b004e621")  # mov al, 0x04; out 0x21, al   (ICW3)
    + bytes.fromhex("b001e621")  # mov al, 0x01; out 0x21, al   (ICW4: 8086 mode)
    + bytes.fromhex("b0efe621")  # mov al, 0xef; out 0x21, al   (OCW1: unmask IRQ 4 only)
    + bytes.fromhex("fb")  # sti
    + bytes.fromhex("e611")  # out 0x11, al   (tell the test we are ready)
    + bytes.fromhex("f4")  # hlt
)
IRQ4_HANDLER = 0x2000
IRQ4_HANDLER_CODE = bytes.fromhex("b099e610")  # mov al, 0x99; out 0x10, al


@pytest.mark.parametrize("source", ["irqfd", "irq_line"])
def test_interrupt_wakes_a_halted_guest_through_the_pic(guest, source):
    g = guest(PIC_GUEST)
    g.memory.write_u32(12 * 4, IRQ4_HANDLER)  # IVT entry for vector 8 + 4: 0000:2000
    g.memory.write(IRQ4_HANDLER, IRQ4_HANDLER_CODE)
    event = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        g.vm.assign_irqfd(event, 4)
        exit = g.vcpu.run()
        assert isinstance(exit, IoExit) and exit.port == 0x11
        if source == "irqfd":
            os.eventfd_write(event, 1)
        else:
            g.vm.irq_line(4, True)
            g.vm.irq_line(4, False)
        exit = g.vcpu.run()
        assert isinstance(exit, IoExit), exit
        assert (exit.port, bytes(exit.data)) == (0x10, b"\x99")
    finally:
        os.close(event)
