"""MP table: checksums, entry counts and routing, read back the way Linux's mpparse reads it."""

from __future__ import annotations

import struct

import pytest

from kvmlet.boot.memory_map import IOAPIC_ADDRESS, LAPIC_ADDRESS, MP_TABLE_AREA
from kvmlet.boot.mptable import PciInterrupt, build_mp_table, write_mp_table
from kvmlet.errors import KvmletError

ENTRY_SIZES = {0: 20, 1: 8, 2: 8, 3: 8, 4: 8}


def parse(table: bytes, address: int = MP_TABLE_AREA.base):
    """Check both checksums and split the configuration table into (type, bytes) entries."""
    pointer = table[:16]
    assert pointer[:4] == b"_MP_"
    assert sum(pointer) % 256 == 0
    physptr, length_paragraphs, revision = struct.unpack_from("<IBB", pointer, 4)
    assert (length_paragraphs, revision) == (1, 4)
    config = table[physptr - address :]
    signature, length, spec, _checksum = struct.unpack_from("<4sHBB", config)
    assert (signature, spec) == (b"PCMP", 4)
    config = config[:length]
    assert len(config) == length
    assert sum(config) % 256 == 0
    oem_pointer, oem_size, entry_count, lapic, extended_length = struct.unpack_from(
        "<IHHIH", config, 28
    )
    assert (oem_pointer, oem_size, extended_length) == (0, 0, 0)
    assert lapic == LAPIC_ADDRESS
    entries, offset = [], 44
    while offset < length:
        size = ENTRY_SIZES[config[offset]]
        entries.append((config[offset], config[offset : offset + size]))
        offset += size
    assert offset == length
    assert len(entries) == entry_count
    return entries


@pytest.mark.parametrize("cpus", [1, 2, 8])
def test_one_processor_per_cpu_and_one_ioapic(cpus):
    entries = parse(build_mp_table(cpus))
    processors = [struct.unpack("<BBBBII8s", data) for kind, data in entries if kind == 0]
    assert [p[1] for p in processors] == list(range(cpus))  # APIC IDs
    assert [p[3] for p in processors] == [3] + [1] * (cpus - 1)  # enabled, BSP on 0
    assert all(p[5] & (1 << 9) for p in processors)  # APIC feature bit
    ioapics = [struct.unpack("<BBBBI", data) for kind, data in entries if kind == 2]
    assert ioapics == [(2, cpus, 0x11, 1, IOAPIC_ADDRESS)]
    buses = {data[1]: data[2:].rstrip(b" ") for kind, data in entries if kind == 1}
    assert buses == {0: b"PCI", 1: b"ISA"}


def test_isa_irqs_map_one_to_one_and_local_interrupts():
    entries = parse(build_mp_table(2))
    routes = [struct.unpack("<BBHBBBB", data) for kind, data in entries if kind == 3]
    assert [(r[3], r[4], r[5], r[6]) for r in routes] == [(1, irq, 2, irq) for irq in range(16)]
    local = [struct.unpack("<BBHBBBB", data) for kind, data in entries if kind == 4]
    assert [(r[1], r[5], r[6]) for r in local] == [(3, 0xFF, 0), (1, 0xFF, 1)]  # ExtINT, NMI


def test_pci_intx_routes():
    routes = [PciInterrupt(device=3, pin=1, irq=16), PciInterrupt(device=4, pin=2, irq=10)]
    entries = parse(build_mp_table(1, routes))
    interrupts = [struct.unpack("<BBHBBBB", data) for kind, data in entries if kind == 3]
    pci = [(r[4], r[6]) for r in interrupts if r[3] == 0]
    assert pci == [((3 << 2) | 0, 16), ((4 << 2) | 1, 10)]
    isa_pins = [r[6] for r in interrupts if r[3] == 1]
    assert 10 not in isa_pins and len(isa_pins) == 15  # the pin given to PCI leaves ISA


@pytest.mark.parametrize(
    "fields", [dict(device=32, pin=1, irq=16), dict(device=0, pin=0, irq=16),
               dict(device=0, pin=5, irq=16), dict(device=0, pin=1, irq=24)]
)  # fmt: skip
def test_pci_interrupt_validation(fields):
    with pytest.raises(ValueError):
        PciInterrupt(**fields)


@pytest.mark.parametrize("cpus", [0, 255])
def test_cpu_count_limits(cpus):
    with pytest.raises(KvmletError, match="1 to 254 vCPUs"):
        build_mp_table(cpus)


def test_written_where_linux_scans(memory):
    address = write_mp_table(memory, 4)
    assert 0xF0000 <= address < 0x100000 and address % 16 == 0
    table = memory.read(address, 0x400)
    assert len(parse(table, address)) == 4 + 2 + 1 + 16 + 2
