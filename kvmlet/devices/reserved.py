"""A range of the bus another component serves: KVM's in-kernel devices.

With an in-kernel irqchip and PIT, KVM answers the PICs, the PIT, the IOAPIC and each vCPU's
local APIC before an access could exit to user space. The machine still covers each with a
region of this device, so the bus's map is the one the guest sees: a BAR placed on the IOAPIC is
hidden beneath it (no ioeventfd KVM would never reach), and `--debug-io` and describe name it.

An access that does exit there (the local APIC's page while the guest runs it in x2APIC mode, or
after it moved the APIC's base) reaches no device: a read is all-ones and a write is dropped, as
for an unassigned address, and the bus counts it under the device's name.
"""

from __future__ import annotations


class Reserved:
    """Register handlers of a reserved range: all-ones reads, dropped writes."""

    def read(self, offset: int, size: int) -> int:
        return (1 << (8 * size)) - 1

    def write(self, offset: int, size: int, value: int) -> None:
        pass
