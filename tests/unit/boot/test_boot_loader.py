"""The boot entry points: format detection, early checks for the CLI, and the real kernel."""

from __future__ import annotations

import struct

import pytest

from kvmlet.boot import KernelInfo, inspect_kernel, load_kernel
from kvmlet.boot.bzimage import parse_setup_header
from kvmlet.boot.elf import parse_elf
from kvmlet.boot.memory_map import MP_TABLE_AREA, MemoryMap, MiB
from kvmlet.errors import KvmletError
from kvmlet.guest.kernel import cache_root
from kvmlet.memory import GuestMemory
from tests.unit.boot.synthetic_kernels import make_bzimage, make_elf, pvh_note


def test_formats_are_recognised(tmp_path):
    bzimage = tmp_path / "bzImage"
    bzimage.write_bytes(make_bzimage())
    vmlinux = tmp_path / "vmlinux"
    vmlinux.write_bytes(
        make_elf([(16 * MiB, 16 * MiB, b"\x90" * 64, 64)], entry=16 * MiB, notes=pvh_note(16 * MiB))
    )
    assert inspect_kernel(bzimage) == KernelInfo("bzImage", True, False)
    assert inspect_kernel(vmlinux) == KernelInfo("elf", True, True)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "No such file"),
        (b"", "is empty"),
        (b"#!/bin/sh\necho hello\n", "neither a bzImage, an ELF vmlinux nor multiboot"),
        (make_bzimage(xloadflags=0), "32-bit only"),
    ],
    ids=["missing", "empty", "script", "32-bit"],
)
def test_unbootable_files_give_one_line_naming_the_file(tmp_path, content, message):
    path = tmp_path / "kernel"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(KvmletError, match=message) as error:
        inspect_kernel(path)
    assert str(path) in str(error.value) and "\n" not in str(error.value)


def test_a_directory_is_not_a_kernel(tmp_path):
    with pytest.raises(KvmletError, match="Is a directory"):
        inspect_kernel(tmp_path)


def test_missing_initrd(tmp_path, memory, memory_map):
    kernel = tmp_path / "bzImage"
    kernel.write_bytes(make_bzimage())
    with pytest.raises(KvmletError, match="cannot read initrd"):
        load_kernel(memory, kernel, tmp_path / "nope", "", memory_map, cpus=1)


def test_load_kernel_writes_the_mp_table(tmp_path, memory, memory_map):
    kernel = tmp_path / "bzImage"
    kernel.write_bytes(make_bzimage())
    load_kernel(memory, kernel, None, "", memory_map, cpus=3)
    assert memory.read(MP_TABLE_AREA.base, 4) == b"_MP_"
    table = memory.read_u32(MP_TABLE_AREA.base + 4)
    assert memory.read(table, 4) == b"PCMP"
    assert memory.read_u16(table + 34) == 3 + 2 + 1 + 16 + 2  # entry count


def _cached_kernel(name: str):
    builds = sorted((cache_root() / "kernel").glob(f"*/{name}"))
    if not builds:
        pytest.skip(f"no {name} built under {cache_root() / 'kernel'} (python3 -m kvmlet.guest)")
    return builds[-1]


def test_real_bzimage_parses_and_loads():
    path = _cached_kernel("bzImage")
    header = parse_setup_header(path.read_bytes())
    assert header.version >= 0x020C and header.xloadflags & 1
    assert header.cmdline_size >= 255 and header.init_size > 0
    layout = MemoryMap(256 * MiB)
    memory = GuestMemory.anonymous(layout.ram_banks())
    try:
        state = load_kernel(memory, path, None, "console=ttyS0", layout, cpus=2)
        assert state.mode == "long64" and state.entry == 0x100200
        assert memory.read(state.rsi + 0x202, 4) == b"HdrS"
    finally:
        memory.close()


def test_real_vmlinux_has_both_entries_and_loads_by_either():
    path = _cached_kernel("vmlinux")
    kernel = parse_elf(path.read_bytes())
    assert kernel.entry is not None and kernel.pvh_entry is not None
    layout = MemoryMap(256 * MiB)
    memory = GuestMemory.anonymous(layout.ram_banks())
    try:
        for method, mode in (("auto", "long64"), ("pvh", "protected32")):
            state = load_kernel(memory, path, None, "", layout, cpus=1, boot_method=method)
            assert state.mode == mode
        first = kernel.segments[0]
        loaded = memory.read(first.physical_address, 64)
        assert loaded == path.read_bytes()[first.file_offset : first.file_offset + 64]
        assert struct.unpack("<I", memory.read(state.rbx, 4))[0] == 0x336EC578
    finally:
        memory.close()


def test_zero_page_of_a_guest_larger_than_the_pci_hole(tmp_path):
    layout = MemoryMap(4 * 1024 * MiB)  # anonymous MAP_NORESERVE: costs only touched pages
    memory = GuestMemory.anonymous(layout.ram_banks())
    kernel = tmp_path / "bzImage"
    kernel.write_bytes(make_bzimage())
    initrd = tmp_path / "initrd"
    initrd.write_bytes(b"\x09" * 4096)
    try:
        state = load_kernel(memory, kernel, initrd, "", layout, cpus=1)
        assert memory.read_u8(state.rsi + 0x1E8) == 4
        assert struct.unpack("<QQI", memory.read(state.rsi + 0x2D0 + 3 * 20, 20)) == (
            4 << 30,
            1 << 30,
            1,
        )
        ramdisk = memory.read_u32(state.rsi + 0x218)
        assert ramdisk + 4096 <= 3 << 30  # in low RAM, below the hole
        assert memory.read(ramdisk, 4096) == b"\x09" * 4096
    finally:
        memory.close()


@pytest.mark.parametrize(
    "image",
    [
        make_bzimage(init_size=60 * MiB),
        make_elf([(80 * MiB, 80 * MiB, b"\x90" * 64, 64)], entry=80 * MiB),
    ],
    ids=["bzImage", "vmlinux"],
)
def test_kernel_too_big_for_ram_is_a_clear_error_from_a_mapped_file(tmp_path, memory, image):
    kernel = tmp_path / "kernel"
    kernel.write_bytes(image)
    with pytest.raises(KvmletError, match="give it more memory"):
        load_kernel(memory, kernel, None, "", MemoryMap(64 * MiB), cpus=1)
