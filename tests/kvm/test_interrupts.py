"""KvmInterruptRouter, KvmIrqLine and IrqfdLine on a real VM with the in-kernel irqchip, and
the doorbell path (ioeventfd -> QueueWorker) end to end.

Whether a GSI is routed is read with KVM_IRQ_LINE_STATUS: KVM reports -1 for a GSI with no route
and a count (>= 0) of the chips it reached otherwise. The last test delivers a level-triggered
irqfd interrupt through the PIC to a tiny real-mode guest, twice (the resample fd re-raises the
still-asserted line after the guest's EOI), and not a third time once the device lowered it.
"""

from __future__ import annotations

import ctypes
import os
import select
import signal
import threading
import time

import pytest

from kvmlet.errors import KvmletError
from kvmlet.kvm import InterruptedExit, IoExit, Kvm
from kvmlet.kvm import ioctls as nr
from kvmlet.kvm import structs as s
from kvmlet.kvm._syscall import ioctl_struct
from kvmlet.memory import GuestMemory
from kvmlet.virtio.rng import VirtioRng
from kvmlet.virtio.worker import QueueWorker, doorbell
from kvmlet.vstate.interrupts import IrqfdLine, KvmInterruptRouter, KvmIrqLine, default_routes
from tests.helpers.virtio_driver import MockDriver

pytestmark = pytest.mark.kvm

KVM_IRQ_LINE_STATUS = nr._IOWR(nr.KVMIO, 0x67, s.KvmIrqLevel)
RAM_SIZE = 0x10000
CODE = 0x1000
HANDLER = 0x1100
MSI_ADDRESS = 0xFEE0_0000


def line_status(vm, gsi: int, level: bool) -> int:
    argument = s.KvmIrqLevel(gsi, int(level))
    ioctl_struct(vm.fd, KVM_IRQ_LINE_STATUS, argument)
    return ctypes.c_int32(argument.irq).value  # the kernel writes the status over `irq`


@pytest.fixture
def vm():
    with Kvm() as kvm:
        vm = kvm.create_vm()
        vm.setup_x86_platform()
        yield vm
        vm.close()


def test_default_table_matches_kvm_x86():
    routes = default_routes()
    assert len(routes) == 24 + 16
    assert {(r.gsi, r.irqchip, r.pin) for r in routes if r.gsi in (2, 9)} == {
        (2, nr.KVM_IRQCHIP_IOAPIC, 2),
        (2, nr.KVM_IRQCHIP_PIC_MASTER, 2),
        (9, nr.KVM_IRQCHIP_IOAPIC, 9),
        (9, nr.KVM_IRQCHIP_PIC_SLAVE, 1),
    }


def test_msi_routes_keep_the_default_irqchip_routes(vm):
    vcpu = vm.create_vcpu(0)
    router = KvmInterruptRouter(vm)
    try:
        controller = router.controller()
        config, queue = controller.vector(0), controller.vector(1)
        assert (config.gsi, queue.gsi) == (24, 25)
        assert line_status(vm, queue.gsi, True) == -1, "no route before the guest programs it"
        queue.update(MSI_ADDRESS, 0x31, masked=True)
        assert router.table_updates == 0, "a masked vector is not routed"
        with controller.batch():
            queue.update(MSI_ADDRESS, 0x31, masked=False)
            config.update(MSI_ADDRESS, 0x30, masked=False)
        assert router.table_updates == 1, "one KVM_SET_GSI_ROUTING for the batch"
        queue.update(MSI_ADDRESS, 0x31, masked=False)
        assert router.table_updates == 1, "nothing changed, nothing re-installed"
        queue.update(MSI_ADDRESS, 0x41, masked=False)
        assert router.table_updates == 2
        assert line_status(vm, queue.gsi, True) >= 0
        assert line_status(vm, 4, True) >= 0, "GSI 4 still reaches the PIC and IO-APIC"
        assert line_status(vm, 4, False) >= 0
        assert line_status(vm, 40, True) == -1
        queue.fire()
        config.fire()
        KvmIrqLine(vm, 4).pulse()
    finally:
        router.close()
        vcpu.close()


def test_running_out_of_gsis_is_a_clear_error(vm):
    router = KvmInterruptRouter(vm, gsi_limit=25)
    try:
        router.controller().vector(0)
        with pytest.raises(KvmletError, match="out of GSIs"):
            router.controller().vector(0)
    finally:
        router.close()


def real_mode_guest(vm, memory, code=None):
    """A vCPU at 0:CODE running `code`, by default PIC_PROGRAM."""
    memory.write(CODE, code or PIC_PROGRAM)
    memory.write(HANDLER, PIC_HANDLER)
    memory.write_u16(4 * 12, HANDLER)
    memory.write_u16(4 * 12 + 2, 0)
    vm.add_memory(0, RAM_SIZE, memory.banks[0].host_address())
    vcpu = vm.create_vcpu(0)
    sregs = vcpu.get_sregs()
    sregs.cs.base = sregs.cs.selector = 0
    vcpu.set_sregs(sregs)
    regs = vcpu.get_regs()
    regs.rip, regs.rflags = CODE, 2
    vcpu.set_regs(regs)
    return vcpu


PIC_PROGRAM = bytes.fromhex(
    "fa"  # cli
    "b011e620"  # ICW1: edge, cascade, ICW4 needed
    "b008e621"  # ICW2: vector base 8
    "b004e621"  # ICW3: slave on IRQ 2
    "b001e621"  # ICW4: 8086 mode
    "b0efe621"  # OCW1: mask everything but IRQ 4
    "fb"  # sti
    "f4"  # hlt
    "ebfd"  # jmp back to hlt
)
"""Program the master PIC (vectors 8-15, only IRQ 4 unmasked), then sti; hlt forever."""
PIC_HANDLER = bytes.fromhex("b020e620b044e610cf")
"""IRQ 4 (vector 12): EOI to the PIC, `out 0x10, 0x44`, iret."""


def run_for(vcpu, seconds: float):
    """One KVM_RUN, interrupted by SIGALRM after `seconds` if the guest never exits."""
    previous = signal.signal(signal.SIGALRM, lambda *_: None)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        return vcpu.run()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def test_a_doorbell_write_reaches_the_worker_without_an_exit(vm):
    """The guest's 16-bit notify write signals the ioeventfd in the kernel (the next exit is
    the `out` after it) and the worker runs the queue."""
    memory = GuestMemory.anonymous([(0, RAM_SIZE)])
    code = bytes.fromhex(
        "b80020"  # mov ax, 0x2000
        "8ed8"  # mov ds, ax
        "c70610000000"  # mov word [0x10], 0: the notify write at 0x20010
        "e610"  # out 0x10, al
    )
    vcpu = real_mode_guest(vm, memory, code)
    device = VirtioRng(memory)
    driver = MockDriver(device, memory, 0x4000, 0x8000)
    driver.initialize(queue_size=8)
    head, _ = driver.post_data(0, [], [16])
    bell = doorbell(device, 0)
    worker = QueueWorker()
    try:
        vm.assign_ioeventfd(bell.eventfd, 0x20010, 2, pio=False)
        worker.add(bell)
        worker.start()
        exit = run_for(vcpu, 2.0)
        assert isinstance(exit, IoExit) and exit.port == 0x10, exit
        deadline = time.monotonic() + 2.0
        while device.queue_stats[0].requests == 0 and time.monotonic() < deadline:
            time.sleep(0.001)
        assert [c.head for c in driver.collect(0)] == [head]
        assert bell.wakeups == 1
    finally:
        worker.stop()
        bell.close()
        vcpu.close()
        device.close()
        memory.close()


def test_level_irqfd_line_is_resampled_after_the_guest_eoi(vm):
    memory = GuestMemory.anonymous([(0, RAM_SIZE)])
    vcpu = real_mode_guest(vm, memory)
    line = IrqfdLine(vm, 4, level=True)
    try:
        raise_later = threading.Timer(0.05, line.set_level, (True,))
        raise_later.start()
        exit = run_for(vcpu, 2.0)
        raise_later.join()
        assert isinstance(exit, IoExit) and exit.port == 0x10, exit
        readable, _, _ = select.select([line.resample_fd], [], [], 1.0)
        assert readable, "KVM signals the resample fd at the guest's EOI"
        line.resampled()
        exit = run_for(vcpu, 2.0)
        assert isinstance(exit, IoExit) and exit.port == 0x10, "re-raised: still asserted"
        line.set_level(False)
        select.select([line.resample_fd], [], [], 1.0)
        line.resampled()
        assert isinstance(run_for(vcpu, 0.2), InterruptedExit), "lowered: no third interrupt"
        assert line.raises == 2
    finally:
        line.close()
        vcpu.close()
        memory.close()


LAPIC_PROGRAM = bytes.fromhex(
    "fa"  # cli
    "2666c706f000ff010000"  # mov dword es:[0xf0], 0x1ff: spurious vector register, APIC on
    "fb"  # sti
    "f4"  # hlt
    "ebfd"  # jmp back to hlt
)
"""Software-enable the local APIC (ES is based at it), then sti; hlt forever."""
MSI_VECTOR = 0x41
MSI_HANDLER = bytes.fromhex(
    "2666c706b00000000000"  # mov dword es:[0xb0], 0: EOI (the APIC takes dword accesses only)
    "b044e610"  # out 0x10, 0x44
    "cf"  # iret
)
"""Vector 0x41: EOI to the local APIC, `out 0x10, 0x44`, iret."""


def lapic_guest(vm, memory):
    """A real-mode vCPU that takes MSI vector 0x41 (an `out 0x10` each time) and halts."""
    vcpu = real_mode_guest(vm, memory, LAPIC_PROGRAM)
    memory.write(HANDLER, MSI_HANDLER)
    memory.write_u16(4 * MSI_VECTOR, HANDLER)
    memory.write_u16(4 * MSI_VECTOR + 2, 0)
    sregs = vcpu.get_sregs()
    sregs.es.base = MSI_ADDRESS
    vcpu.set_sregs(sregs)
    return vcpu


def signalled(fd: int) -> bool:
    return bool(select.select([fd], [], [], 0)[0])


def test_an_attached_eventfd_interrupts_the_guest_with_no_python_step(vm):
    """A vhost backend's call eventfd attached to an MSI vector: the write is the whole path
    (no worker, no Python between it and the guest's handler); once detached, writes stay
    counted for a relay, and attaching with a count pending delivers it once."""
    memory = GuestMemory.anonymous([(0, RAM_SIZE)])
    vcpu = lapic_guest(vm, memory)
    router = KvmInterruptRouter(vm)
    call = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    try:
        vector = router.controller().vector(1)
        vector.update(MSI_ADDRESS, MSI_VECTOR, masked=False)
        vector.attach(call)
        assert isinstance(run_for(vcpu, 0.2), InterruptedExit), "halted, nothing pending"
        threading.Timer(0.05, os.eventfd_write, (call, 1)).start()
        exit = run_for(vcpu, 2.0)
        assert isinstance(exit, IoExit) and exit.port == 0x10, exit
        assert not signalled(call), "KVM took the count"
        assert vector.fired == 0, "nothing went through the vector's own eventfd"

        vector.detach(call)
        os.eventfd_write(call, 1)
        assert isinstance(run_for(vcpu, 0.2), InterruptedExit), "detached: no interrupt"
        assert signalled(call), "the write waits in the eventfd for a relay"

        vector.attach(call)
        exit = run_for(vcpu, 2.0)
        assert isinstance(exit, IoExit) and exit.port == 0x10, "the pending count, at attach"
        assert isinstance(run_for(vcpu, 0.2), InterruptedExit), "and only once"
        vector.detach(call)
        assert not signalled(call), "detaching discards the count KVM already delivered"
    finally:
        router.close()
        os.close(call)
        vcpu.close()
        memory.close()


def test_an_eventfd_is_attached_only_once_its_route_is_installed(vm):
    vcpu = vm.create_vcpu(0)
    router = KvmInterruptRouter(vm)
    call = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    try:
        controller = router.controller()
        vector = controller.vector(0)
        with controller.batch():
            vector.update(MSI_ADDRESS, 0x31, masked=False)
            assert router.table_updates == 0
            vector.attach(call)
            assert router.table_updates == 1, "the batch's routes went in before the irqfd"
            assert line_status(vm, vector.gsi, True) >= 0
        assert router.table_updates == 1, "and nothing was left to install"
        other = router.controller().vector(0)
        with pytest.raises(KvmletError, match="KVM_IRQFD"):
            other.attach(call)  # one irqfd per eventfd and VM
        vector.detach(call)
        other.attach(call)  # free again
        other.detach(call)
    finally:
        router.close()
        os.close(call)
        vcpu.close()
