"""ELF vmlinux: segments, the PVH note, both entries, hvm_start_info, and fuzzing."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmlet.boot import load_kernel
from kvmlet.boot.elf import load_elf, parse_elf
from kvmlet.boot.memory_map import CMDLINE_AREA, MemoryMap, MiB
from kvmlet.boot.x86_64 import CODE32_SELECTOR, CODE64_SELECTOR
from kvmlet.errors import KvmletError
from kvmlet.memory import GuestMemory
from tests.unit.boot.synthetic_kernels import make_elf, note, pvh_note

TEXT = bytes(range(256)) * 16
PHYS = 16 * MiB
VIRT = 0xFFFF_FFFF_8100_0000
PVH_ENTRY = PHYS + 0x40
PVH_NOTE = pvh_note(PVH_ENTRY)


def vmlinux(*, notes=PVH_NOTE, entry=PHYS, **options):
    """A kernel with a text segment and a data segment whose bss is 4 KiB."""
    segments = [
        (PHYS, VIRT, TEXT, len(TEXT)),
        (PHYS + 0x10000, VIRT + 0x10000, b"DATA" * 16, 64 + 4096),
    ]
    return make_elf(segments, entry=entry, notes=notes, **options)


@pytest.mark.parametrize("notes_in", ["segment", "section"])
@pytest.mark.parametrize("size", [4, 8])
def test_pvh_note_found_in_a_segment_or_a_section(notes_in, size):
    kernel = parse_elf(vmlinux(notes=pvh_note(PVH_ENTRY, size), notes_in=notes_in))
    assert kernel.pvh_entry == PVH_ENTRY


def test_other_notes_are_skipped():
    notes = struct.pack("<III", 4, 4, 1) + b"GNU\0" + b"abcd" + pvh_note(PVH_ENTRY)
    assert parse_elf(vmlinux(notes=notes)).pvh_entry == PVH_ENTRY


def test_without_note_there_is_no_pvh_entry():
    assert parse_elf(vmlinux(notes=b"")).pvh_entry is None


def test_virtual_entry_is_translated_to_physical():
    assert parse_elf(vmlinux(entry=VIRT + 0x123)).entry == PHYS + 0x123
    assert parse_elf(vmlinux(entry=PHYS + 0x123)).entry == PHYS + 0x123
    assert parse_elf(vmlinux(entry=0x1234)).entry is None


BAD_FILES = [
    (b"\x7fEL", "not an ELF file"),
    (b"\x7fELF" + bytes(20), "ELF header is cut short"),
    (vmlinux(elf_class=1), "not an x86-64 ELF"),
    (vmlinux(machine=3), "not an x86-64 ELF"),
    (make_elf([], entry=0), "no loadable segment"),
    (vmlinux()[:100], "program headers lie past its end"),
    (vmlinux(notes=b"")[:-10], "segment lies past its end"),
    (vmlinux(notes=pvh_note(0x1234)), "PVH entry lies outside"),
    (vmlinux(notes=note(b"Xen\0", 18, b"\x40\x00")), "bad size"),
]


@pytest.mark.parametrize(("image", "message"), BAD_FILES, ids=[m for _, m in BAD_FILES])
def test_bad_elf_files_give_one_clear_error(image, message):
    with pytest.raises(KvmletError, match=message):
        parse_elf(image)


def test_segments_load_at_physical_addresses_with_bss_zeroed(memory, memory_map):
    memory.fill(PHYS, 0x20000, 0xAA)
    kernel = load_elf(memory, vmlinux(), memory_map)
    assert memory.read(PHYS, len(TEXT)) == TEXT
    assert memory.read(PHYS + 0x10000, 64) == b"DATA" * 16
    assert memory.read(PHYS + 0x10000 + 64, 4096) == bytes(4096)
    assert kernel.end == PHYS + 0x10000 + 64 + 4096


@pytest.mark.parametrize("physical", [0x1000, 63 * MiB, 0x1_0000_0000])
def test_segment_outside_low_ram_is_refused(memory, memory_map, physical):
    image = make_elf([(physical, physical, TEXT, 2 * MiB)], entry=physical)
    with pytest.raises(KvmletError, match="outside the guest's low RAM"):
        load_elf(memory, image, memory_map)


def _boot(memory, memory_map, tmp_path, image, method="auto", initrd=None):
    kernel = tmp_path / "vmlinux"
    kernel.write_bytes(image)
    initrd_path = None
    if initrd is not None:
        initrd_path = tmp_path / "initrd"
        initrd_path.write_bytes(initrd)
    return load_kernel(
        memory, kernel, initrd_path, "console=ttyS0", memory_map, cpus=1, boot_method=method
    )


def test_pvh_boot_builds_hvm_start_info(memory, memory_map, tmp_path):
    initrd = b"\x05" * 3000
    state = _boot(memory, memory_map, tmp_path, vmlinux(), method="pvh", initrd=initrd)
    assert state.mode == "protected32" and state.entry == PVH_ENTRY
    assert state.cr3 == 0 and state.code_selector == CODE32_SELECTOR
    info = struct.unpack("<IIIIQQQQII", memory.read(state.rbx, 56))
    magic, version, _flags, modules, modlist, cmdline, rsdp, memmap, entries, _ = info
    assert (magic, version, modules, rsdp) == (0x336EC578, 1, 1, 0)
    assert cmdline == CMDLINE_AREA.base
    assert memory.read(cmdline, 14) == b"console=ttyS0\0"
    address, size, module_cmdline, _ = struct.unpack("<QQQQ", memory.read(modlist, 32))
    assert size == len(initrd) and memory.read(address, size) == initrd
    assert module_cmdline == 0
    table = [struct.unpack("<QQII", memory.read(memmap + 24 * i, 24)) for i in range(entries)]
    assert table == [(e.address, e.size, e.type, 0) for e in memory_map.e820()]


def test_auto_prefers_the_64bit_entry_with_its_rng_seed(memory, memory_map, tmp_path):
    state = _boot(memory, memory_map, tmp_path, vmlinux(entry=VIRT + 0x200))
    assert state.mode == "long64" and state.entry == PHYS + 0x200
    assert state.code_selector == CODE64_SELECTOR and state.cr3 != 0
    assert memory.read(state.rsi + 0x202, 4) == b"HdrS"
    assert memory.read_u16(state.rsi + 0x206) == 0x020C
    setup_data = memory.read_u64(state.rsi + 0x250)
    assert struct.unpack("<QII", memory.read(setup_data, 16)) == (0, 9, 32)


def test_auto_falls_back_to_pvh_without_a_usable_entry(memory, memory_map, tmp_path):
    state = _boot(memory, memory_map, tmp_path, vmlinux(entry=0x1234))
    assert state.mode == "protected32"


def test_pvh_requested_without_the_note(memory, memory_map, tmp_path):
    with pytest.raises(KvmletError, match="CONFIG_PVH"):
        _boot(memory, memory_map, tmp_path, vmlinux(notes=b""), method="pvh")


def test_unknown_boot_method(memory, memory_map, tmp_path):
    with pytest.raises(KvmletError, match="unknown boot method"):
        _boot(memory, memory_map, tmp_path, vmlinux(), method="uefi")


VALID = vmlinux()


@st.composite
def mutated_images(draw):
    image = bytearray(VALID[: draw(st.integers(0, len(VALID)))])
    for _ in range(draw(st.integers(0, 8))):
        if image:
            image[draw(st.integers(0, min(len(image), 400) - 1))] = draw(st.integers(0, 255))
    return bytes(image)


@settings(max_examples=300)
@given(image=st.one_of(st.binary(max_size=1024).map(lambda b: b"\x7fELF" + b), mutated_images()))
def test_fuzzed_elf_files_load_or_fail_cleanly(image):
    layout = MemoryMap(32 * MiB)
    memory = GuestMemory.anonymous(layout.ram_banks())
    try:
        kernel = load_elf(memory, image, layout)
    except KvmletError:
        return
    finally:
        memory.close()
    assert all(
        1 * MiB <= s.physical_address and s.physical_end <= 32 * MiB for s in kernel.segments
    )
