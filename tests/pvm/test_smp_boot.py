"""Two vCPUs on this machine's software KVM: why the pvm profile hides KVM's hypercall
features, and the default guest bringing up its second CPU.

On this host a hypercall (VMCALL) from guest kernel code never completes: KVM_RUN stays in
the kernel until the monitor kicks the vCPU. A Linux guest with KVM's PV IPIs makes one as soon
as its first application processor comes up (KVM_HC_SEND_IPI, holding a lock the boot CPU then
spins on), so the boot stopped at "x86: Booting SMP configuration". With the features hidden
the guest sends IPIs through the local APIC and boots every CPU.
"""

from __future__ import annotations

import pytest

from kvmlet.kvm import Kvm
from kvmlet.machine.config import MachineConfig, with_default_guest
from kvmlet.machine.machine import Machine
from kvmlet.vstate import host_profile
from kvmlet.vstate.cpu import CPUID_KVM_FEATURES, KVM_HYPERCALL_FEATURES
from kvmlet.vstate.vcpu_loop import StopReason

pytestmark = pytest.mark.pvm

UNKNOWN_HYPERCALL = 9999  # KVM answers -KVM_ENOSYS in RAX on hardware
VMCALL_THEN_PRINT = bytes.fromhex(
    "66b80f270000"  # mov eax, 9999
    "0f01c1"  # vmcall
    "b058 baf803 ee"  # mov al, 'X' ; mov dx, 0x3f8 ; out dx, al
    "b0fe e664"  # mov al, 0xfe ; out 0x64, al   (reset)
)
BOOT_TIMEOUT = 240.0
"""The default guest brings up its CPUs ~10 s into a ~70 s boot here; room for a busy host."""


@pytest.fixture(autouse=True)
def software_kvm_only():
    if not host_profile.is_software_kvm():
        pytest.skip("this host's KVM is not the software PVM KVM")


def test_a_hypercall_from_guest_kernel_code_never_returns_on_this_host():
    config = MachineConfig(boot_code=VMCALL_THEN_PRINT, rng=False, host_profile="none")
    with Machine(config) as machine:
        stop = machine.wait(2.0)
    assert stop.reason is StopReason.TIMEOUT, stop
    assert machine.console.transcript() == b""


def test_the_pvm_profile_hides_kvm_hypercall_features_from_every_vcpu():
    with Kvm() as kvm:
        offered = {entry.function: entry.eax for entry in kvm.supported_cpuid()}
    config = MachineConfig(boot_code=b"\xf4", rng=False, host_profile="pvm", cpus=2)
    machine = Machine(config)
    try:
        seen = [
            next(e.eax for e in vcpu.get_cpuid2() if e.function == CPUID_KVM_FEATURES)
            for vcpu in machine.vcpus
        ]
    finally:
        machine.close()
    assert offered[CPUID_KVM_FEATURES] & KVM_HYPERCALL_FEATURES  # the host does offer them
    assert seen == [offered[CPUID_KVM_FEATURES] & ~KVM_HYPERCALL_FEATURES] * 2


@pytest.mark.slow
def test_the_default_guest_brings_up_both_cpus():
    with Machine(with_default_guest(MachineConfig(cpus=2))) as machine:
        machine.console.wait_for(
            r"smp: Brought up 1 node, 2 CPUs", BOOT_TIMEOUT, lambda: machine.running
        )
        machine.console.wait_for(r"Total of 2 processors activated", 10.0, lambda: machine.running)
    text = machine.console.text()
    assert "kvm-guest: setup PV IPIs" not in text
