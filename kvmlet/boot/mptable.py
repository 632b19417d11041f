"""An Intel MultiProcessor Specification 1.4 table: how Linux finds our CPUs and IOAPIC.

Without ACPI, Linux discovers the application processors, the IOAPIC and interrupt routing
from an MP table (CONFIG_X86_MPPARSE). It scans the first KiB of the EBDA, the last KiB below
640 KiB and the BIOS area 0xF0000-0xFFFFF for the "_MP_" floating pointer; ours sits at the
start of MP_TABLE_AREA in the BIOS area, followed by the "PCMP" configuration table:

- one processor entry per vCPU, APIC IDs 0..N-1, the BSP flag on 0;
- bus 0 is PCI, bus 1 is ISA;
- one IOAPIC, APIC ID N, version 0x11, at 0xFEC00000 (KVM's in-kernel IOAPIC);
- ISA IRQs 0-15 routed to IOAPIC pins 0-15 one to one. This matches the default GSI routing KVM
  installs with its in-kernel irqchip (kvm_setup_default_irq_routing: GSI n -> IOAPIC pin n),
  the PIT included, which is why Firecracker uses identity too; the PC convention of IRQ0 on
  pin 2 only holds when the VMM reprograms routing (QEMU, Dragonball);
- PCI INTx entries for devices on bus 0, from `PciInterrupt`s the machine chooses;
- ExtINT on every CPU's LINT0 (the 8259 path) and NMI on LINT1.

Entries use "conforms to the bus" polarity and trigger: edge/high for ISA, level/low for PCI.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

from kvmlet.boot.memory_map import IOAPIC_ADDRESS, LAPIC_ADDRESS, MP_TABLE_AREA
from kvmlet.errors import KvmletError
from kvmlet.memory import GuestMemory

_FLOATING_POINTER = struct.Struct("<4sIBBBB4s")
_TABLE_HEADER = struct.Struct("<4sHBB8s12sIHHIHBB")
_PROCESSOR = struct.Struct("<BBBBII8s")
_BUS = struct.Struct("<BB6s")
_IOAPIC = struct.Struct("<BBBBI")
_INTERRUPT = struct.Struct("<BBHBBBB")

MP_SPEC_REVISION = 4  # version 1.4
ENTRY_PROCESSOR, ENTRY_BUS, ENTRY_IOAPIC, ENTRY_IO_INTERRUPT, ENTRY_LOCAL_INTERRUPT = range(5)
CPU_ENABLED = 0x01
CPU_BOOTSTRAP = 0x02
LAPIC_VERSION = 0x14  # integrated xAPIC, as KVM's local APIC reports
IOAPIC_VERSION = 0x11
IOAPIC_USABLE = 0x01
IOAPIC_PINS = 24
ISA_IRQS = 16
# CPU signature (family 6) and CPUID.1:EDX feature bits (FPU, APIC) for processor entries.
CPU_SIGNATURE = 0x600
CPU_FEATURES = (1 << 0) | (1 << 9)
INT_VECTORED, INT_NMI, INT_SMI, INT_EXTINT = range(4)
FLAGS_CONFORM = 0
ALL_LOCAL_APICS = 0xFF
PCI_BUS_ID = 0
ISA_BUS_ID = 1
MAX_CPUS = 254  # APIC IDs are 8 bits, 0xFF is broadcast, and the IOAPIC takes ID N


class PciInterrupt:
    """A PCI device's INTx line on bus 0 wired to an IOAPIC pin.

    `pin` is as in the device's Interrupt Pin register: 1 = INTA# ... 4 = INTD#.
    """

    __slots__ = ("device", "irq", "pin")

    def __init__(self, device: int, pin: int, irq: int):
        if not 0 <= device < 32:
            raise ValueError(f"PCI device number {device} out of range 0-31")
        if not 1 <= pin <= 4:
            raise ValueError(f"PCI interrupt pin {pin} out of range 1 (INTA) - 4 (INTD)")
        if not 0 <= irq < IOAPIC_PINS:
            raise ValueError(f"IOAPIC pin {irq} out of range 0-{IOAPIC_PINS - 1}")
        self.device = device
        self.pin = pin
        self.irq = irq

    def __repr__(self) -> str:
        return f"PciInterrupt(device={self.device}, pin={self.pin}, irq={self.irq})"


def checksum_byte(data: bytes) -> int:
    """The byte that makes the sum of `data` plus itself zero modulo 256."""
    return -sum(data) & 0xFF


def build_mp_table(
    cpus: int, pci_interrupts: Sequence[PciInterrupt] = (), address: int = MP_TABLE_AREA.base
) -> bytes:
    """The floating pointer followed by the configuration table, to be placed at `address`."""
    if not 1 <= cpus <= MAX_CPUS:
        raise KvmletError(f"kvmlet supports 1 to {MAX_CPUS} vCPUs, not {cpus}")
    ioapic_id = cpus
    entries = []
    for apic_id in range(cpus):
        flags = CPU_ENABLED | (CPU_BOOTSTRAP if apic_id == 0 else 0)
        entries.append(
            _PROCESSOR.pack(
                ENTRY_PROCESSOR,
                apic_id,
                LAPIC_VERSION,
                flags,
                CPU_SIGNATURE,
                CPU_FEATURES,
                bytes(8),
            )
        )
    entries.append(_BUS.pack(ENTRY_BUS, PCI_BUS_ID, b"PCI   "))
    entries.append(_BUS.pack(ENTRY_BUS, ISA_BUS_ID, b"ISA   "))
    entries.append(
        _IOAPIC.pack(ENTRY_IOAPIC, ioapic_id, IOAPIC_VERSION, IOAPIC_USABLE, IOAPIC_ADDRESS)
    )
    pci_pins = {route.irq for route in pci_interrupts}
    for irq in range(ISA_IRQS):
        if irq not in pci_pins:  # a pin wired to PCI is level-triggered: not for ISA too
            entries.append(_io_interrupt(ISA_BUS_ID, irq, ioapic_id, irq))
    for route in pci_interrupts:
        source = (route.device << 2) | (route.pin - 1)
        entries.append(_io_interrupt(PCI_BUS_ID, source, ioapic_id, route.irq))
    entries.append(
        _INTERRUPT.pack(
            ENTRY_LOCAL_INTERRUPT, INT_EXTINT, FLAGS_CONFORM, ISA_BUS_ID, 0, ALL_LOCAL_APICS, 0
        )
    )
    entries.append(
        _INTERRUPT.pack(
            ENTRY_LOCAL_INTERRUPT, INT_NMI, FLAGS_CONFORM, ISA_BUS_ID, 0, ALL_LOCAL_APICS, 1
        )
    )
    body = b"".join(entries)
    table_address = address + _FLOATING_POINTER.size
    header = _table_header(len(body), len(entries), checksum=0)
    header = _table_header(len(body), len(entries), checksum_byte(header + body))
    pointer = _FLOATING_POINTER.pack(b"_MP_", table_address, 1, MP_SPEC_REVISION, 0, 0, bytes(4))
    pointer = _FLOATING_POINTER.pack(
        b"_MP_", table_address, 1, MP_SPEC_REVISION, checksum_byte(pointer), 0, bytes(4)
    )
    return pointer + header + body


def _io_interrupt(bus: int, source: int, ioapic_id: int, pin: int) -> bytes:
    return _INTERRUPT.pack(
        ENTRY_IO_INTERRUPT, INT_VECTORED, FLAGS_CONFORM, bus, source, ioapic_id, pin
    )


def _table_header(body_length: int, entry_count: int, checksum: int) -> bytes:
    return _TABLE_HEADER.pack(
        b"PCMP",
        _TABLE_HEADER.size + body_length,
        MP_SPEC_REVISION,
        checksum,
        b"KVMLET  ",
        b"KVMLET      ",
        0,  # no OEM table
        0,
        entry_count,
        LAPIC_ADDRESS,
        0,  # no extended table
        0,
        0,
    )


def write_mp_table(
    memory: GuestMemory, cpus: int, pci_interrupts: Sequence[PciInterrupt] = ()
) -> int:
    """Write the MP table for `cpus` vCPUs into MP_TABLE_AREA; return its address."""
    table = build_mp_table(cpus, pci_interrupts)
    if len(table) > MP_TABLE_AREA.size:
        raise ValueError("MP table does not fit its area")
    memory.write(MP_TABLE_AREA.base, table)
    return MP_TABLE_AREA.base
