"""Typed ioctl layer over /dev/kvm: Kvm -> Vm -> Vcpu, exits as typed values.

with Kvm() as kvm:
    kvm.require()
    vm = kvm.create_vm()
    vm.add_memory(0, len(ram), host_address)
    vm.setup_x86_platform()
    vcpu = vm.create_vcpu(0)
    match vcpu.run():
        case IoExit(port, size, is_write, count, data): ...
"""

from kvmlet.kvm.exits import (
    FailEntryExit,
    HltExit,
    InternalErrorExit,
    InterruptedExit,
    IoExit,
    MmioExit,
    OtherExit,
    ShutdownExit,
    SystemEventExit,
    VcpuExit,
)
from kvmlet.kvm.system import REQUIRED_CAPABILITIES, Kvm
from kvmlet.kvm.vcpu import Vcpu
from kvmlet.kvm.vm import IrqchipRoute, MemorySlot, MsiRoute, SlotAllocator, Vm

__all__ = [
    "REQUIRED_CAPABILITIES",
    "FailEntryExit",
    "HltExit",
    "InternalErrorExit",
    "InterruptedExit",
    "IoExit",
    "IrqchipRoute",
    "Kvm",
    "MemorySlot",
    "MmioExit",
    "MsiRoute",
    "OtherExit",
    "ShutdownExit",
    "SlotAllocator",
    "SystemEventExit",
    "Vcpu",
    "VcpuExit",
    "Vm",
]
