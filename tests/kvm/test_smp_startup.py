"""Application processors on /dev/kvm: how `-c N` machines start their extra vCPUs.

KVM creates every vCPU but the first in KVM_MP_STATE_UNINITIALIZED; kvmlet sets no registers
on them and leaves them to the guest, which starts them as on hardware: INIT, then a Startup
IPI whose vector is the 4 KiB page of the real-mode code an AP begins at. The tiny guest here
does what a kernel's SMP boot does, without Linux:

- the BSP (real mode at 0x10000) enters flat 32-bit protected mode, writes INIT and then
  SIPI (vector 0x11) with the "all excluding self" shorthand to the local APIC's ICR at
  0xFEE00300, and spins until the AP count at 0x11100 reaches CPUID.1:EBX[23:16] - 1, then
  resets through the i8042;
- each AP starts in real mode at 0x11000, prints its APIC ID from CPUID.1:EBX[31:24] as a
  digit on COM1, counts itself in with a locked increment, and halts.
"""

import threading

import pytest

from kvmlet.kvm.ioctls import KVM_MP_STATE_RUNNABLE, KVM_MP_STATE_UNINITIALIZED
from kvmlet.machine.config import BOOT_CODE_ADDRESS, MachineConfig
from kvmlet.machine.machine import Machine
from kvmlet.vstate.vcpu_loop import StopReason

I8042_RESET = bytes.fromhex("b0fe e664")  # mov al, 0xfe ; out 0x64, al

pytestmark = pytest.mark.kvm

AP_START = BOOT_CODE_ADDRESS + 0x1000
SIPI_VECTOR = AP_START >> 12
assert SIPI_VECTOR == 0x11  # the vector is encoded in the BSP code below

BSP_CODE = bytes.fromhex(
    "fa"  # cli
    "2e660f01166800"  # lgdt dword cs:[0x68]
    "0f20c0 0c01 0f22c0"  # mov eax, cr0 ; or al, 1 ; mov cr0, eax
    "66ea1800010008 00"  # jmp dword 0x08:0x10018
    # 32-bit protected mode from here (offset 0x18)
    "66b81000 8ed8"  # mov ax, 0x10 ; mov ds, ax
    "c7050003e0fe00450c00"  # mov dword [0xfee00300], 0x000c4500  (INIT, all but self)
    "c7050003e0fe11460c00"  # mov dword [0xfee00300], 0x000c4611  (SIPI, vector 0x11)
    "b801000000 0fa2"  # mov eax, 1 ; cpuid
    "c1eb10 fecb"  # shr ebx, 16 ; dec bl   (logical processors - 1)
    "f390"  # wait: pause
    "381d00110100 75f6"  # cmp [0x11100], bl ; jne wait
    "b0fe e664 ebfe"  # mov al, 0xfe ; out 0x64, al ; jmp $
    "6690"  # padding to the 8-byte aligned GDT at 0x50
    "0000000000000000"  # GDT: null
    "ffff0000009bcf00"  # 0x08: 32-bit code, 4 GiB flat
    "ffff00000093cf00"  # 0x10: data, 4 GiB flat
    "1700 50000100"  # GDT descriptor at 0x68: limit 23, base 0x10050
)
AP_CODE = bytes.fromhex(
    "66b801000000 0fa2"  # mov eax, 1 ; cpuid
    "66c1eb18"  # shr ebx, 24   (initial APIC ID)
    "8d4730"  # lea ax, [bx + '0']
    "baf803 ee"  # mov dx, 0x3f8 ; out dx, al
    "2ef0fe060001"  # lock inc byte cs:[0x100]   (the AP count at 0x11100)
    "f4 ebfd"  # halt: hlt ; jmp halt
)
SMP_GUEST = BSP_CODE.ljust(AP_START - BOOT_CODE_ADDRESS, b"\0") + AP_CODE


def smp_machine(cpus: int) -> Machine:
    return Machine(MachineConfig(boot_code=SMP_GUEST, rng=False, host_profile="none", cpus=cpus))


def test_application_processors_wait_uninitialized_for_init_and_sipi():
    machine = smp_machine(3)
    try:
        states = [vcpu.get_mp_state() for vcpu in machine.vcpus]
    finally:
        machine.close()
    assert states == [KVM_MP_STATE_RUNNABLE, KVM_MP_STATE_UNINITIALIZED, KVM_MP_STATE_UNINITIALIZED]


@pytest.mark.parametrize("cpus", [2, 4])
def test_the_boot_processor_starts_every_ap_which_sees_its_own_apic_id(cpus):
    with smp_machine(cpus) as machine:
        stop = machine.wait(10)
    assert stop.reason is StopReason.RESET, stop
    reported = sorted(machine.console.transcript().decode())
    assert reported == [str(apic_id) for apic_id in range(1, cpus)]


def test_a_single_vcpu_machine_has_no_processor_to_wake():
    with smp_machine(1) as machine:
        stop = machine.wait(10)
    assert stop.reason is StopReason.RESET, stop
    assert machine.console.transcript() == b""


def test_a_processor_the_guest_never_starts_is_stopped_with_the_machine():
    """As with `nosmp` or `maxcpus=1`: the AP's thread sleeps in KVM_RUN waiting for INIT."""
    config = MachineConfig(boot_code=I8042_RESET, rng=False, host_profile="none", cpus=2)
    with Machine(config) as machine:
        stop = machine.wait(10)
        states = [vcpu.get_mp_state() for vcpu in machine.vcpus]
    assert stop.reason is StopReason.RESET, stop
    assert states[1] == KVM_MP_STATE_UNINITIALIZED
    assert not [thread for thread in threading.enumerate() if thread.name.startswith("vcpu")]
