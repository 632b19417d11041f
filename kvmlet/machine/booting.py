"""A fresh machine's boot path: its guest RAM, the kernel (or boot code) loaded into it, and
the vCPUs set up to run it. A restored machine takes the other path (restore.py): RAM from
the snapshot file, and every vCPU as it was saved.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kvmlet.boot import PciInterrupt, inspect_kernel, load_kernel
from kvmlet.machine.config import BOOT_CODE_ADDRESS, MachineConfig
from kvmlet.machine.virtio_devices import SLOTS_WITH_INTX, intx_irq
from kvmlet.memory import GuestMemory
from kvmlet.vstate.cpu import apply_boot_state, configure_vcpu, start_real_mode, supported_cpuid

if TYPE_CHECKING:
    from kvmlet.boot.x86_64 import BootCpuState
    from kvmlet.machine.machine import Machine


def guest_memory(config: MachineConfig, banks) -> GuestMemory:
    """Guest RAM: in memfds when a vhost-user backend must map it (or asked), else anonymous.
    vhost_config.py (dataclasses, built at import) loads only for a machine that needs it."""
    if config.mem_backend != "auto" or config.filesystems or config.vhost_user_disks:
        from kvmlet.machine.vhost_config import shareable_memory

        if shareable_memory(config):
            return GuestMemory.memfd(banks)
    return GuestMemory.anonymous(banks)


def boot(machine: Machine) -> None:
    """Load the kernel (or the boot code) and set the vCPUs up to boot it."""
    config = machine.config
    boot_state = _load_kernel(machine) if config.boot_code is None else None
    if boot_state is None:
        machine.memory.write(BOOT_CODE_ADDRESS, config.boot_code)
    supported = supported_cpuid(machine.kvm)
    for vcpu in machine.vcpus:
        configure_vcpu(vcpu, supported, config.cpus, machine.profile.cpuid_masks)
    if boot_state is None:
        start_real_mode(machine.vcpus[0], BOOT_CODE_ADDRESS)
    else:
        apply_boot_state(machine.vcpus[0], boot_state)


def _load_kernel(machine: Machine) -> BootCpuState:
    """Load the configured kernel with the command line its boot method takes (kept as the
    machine's `cmdline`)."""
    config = machine.config
    method = inspect_kernel(config.kernel).boot_method(config.boot_method)
    if method == "multiboot":
        machine.cmdline = config.multiboot_command_line()
    else:
        machine.cmdline = config.kernel_command_line(
            machine.virtio.kernel_parameters(), machine.profile.kernel_cmdline_additions()
        )
    return load_kernel(
        machine.memory,
        config.kernel,
        config.initrd,
        machine.cmdline,
        machine.memory_map,
        config.cpus,
        method,
        [PciInterrupt(device=slot, pin=1, irq=intx_irq(slot)) for slot in SLOTS_WITH_INTX],
        config.modules,
    )
