"""The VM-wide state KVM keeps for a snapshot: the in-kernel PICs and IOAPIC, the PIT, kvmclock.

The chips are saved whole as KVM hands them out (KVM_GET_IRQCHIP per chip, KVM_GET_PIT2) and
written back into a fresh VM made the same way (`Vm.setup_x86_platform`). The IOAPIC's
state carries the levels of its input lines (IRR): KVM_SET_IRQCHIP re-injects them, so a
line a device held high at the snapshot is high again (the devices' own record of their lines
is restored with them). The PIT's channels carry their load time as the host's clock read it:
a channel counting at the snapshot counts on from a reload (kvmlet's guests use the local
APIC timer once booted; Firecracker accepts the same).

kvmclock is the value the pause froze (vstate/clock.py): put back when the restored machine
starts, so the guest's clock goes on from where it stopped.

GSI routes and irqfds are not here: the devices that own them re-create them as they are
built and as their MSI-X tables are loaded (vstate/interrupts.py).
"""

from __future__ import annotations

import ctypes

from kvmlet.errors import KvmletError
from kvmlet.kvm import Vm
from kvmlet.kvm import ioctls as nr
from kvmlet.kvm import structs as s

CHIPS = {
    "pic_master": nr.KVM_IRQCHIP_PIC_MASTER,
    "pic_slave": nr.KVM_IRQCHIP_PIC_SLAVE,
    "ioapic": nr.KVM_IRQCHIP_IOAPIC,
}


def save_vm(vm: Vm, clock: int | None) -> dict[str, object]:
    """The in-kernel chips and `clock` (the kvmclock the pause froze, or None)."""
    state: dict[str, object] = {name: bytes(vm.get_irqchip(chip)) for name, chip in CHIPS.items()}
    state["pit"] = bytes(vm.get_pit2())
    state["clock"] = clock
    return state


def _structure(kind: type, blob: object, what: str):
    if not isinstance(blob, bytes) or len(blob) != ctypes.sizeof(kind):
        raise KvmletError(f"the snapshot's {what} state is damaged")
    return kind.from_buffer_copy(blob)


def restore_vm(vm: Vm, state: dict) -> None:
    """Write saved chips into a VM whose irqchip and PIT exist (not the clock: see
    `vstate.clock.thaw_clock`)."""
    for name, chip in CHIPS.items():
        saved = _structure(s.KvmIrqchip, state[name], name)
        if saved.chip_id != chip:
            raise KvmletError(f"the snapshot's {name} state is damaged")
        vm.set_irqchip(saved)
    vm.set_pit2(_structure(s.KvmPitState2, state["pit"], "PIT"))
