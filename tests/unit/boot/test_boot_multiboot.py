"""Multiboot kernels: the header, both image kinds (ELF, a.out kludge), modules, the
information structure, the entry state, malformed images and fuzzing of the header parser."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvmlet.boot import BootModule, inspect_kernel, load_kernel
from kvmlet.boot.memory_map import CMDLINE_AREA, MULTIBOOT_INFO_AREA, PAGE_SIZE, MemoryMap, MiB
from kvmlet.boot.multiboot import (
    BOOTLOADER_MAGIC,
    INFO_BOOT_LOADER_NAME,
    INFO_CMDLINE,
    INFO_MEMORY,
    INFO_MEMORY_MAP,
    INFO_MODULES,
    Module,
    find_header,
    load_multiboot,
    parse_image,
    place_modules,
)
from kvmlet.boot.x86_64 import CODE32_SELECTOR
from kvmlet.errors import KvmletError
from kvmlet.memory import GuestMemory
from tests.unit.boot.synthetic_kernels import (
    make_elf,
    make_elf32,
    make_multiboot_kludge,
    multiboot_header,
)

TEXT = bytes(range(256)) * 4
LOAD = 2 * MiB


def elf32_kernel(entry: int = LOAD, flags: int = 0x3) -> bytes:
    """An ELF32 kernel with its multiboot header right after the program headers, a text
    segment at 2 MiB (linked at 3 GiB + 2 MiB) and a data segment with 8 KiB of bss."""
    segments = [(LOAD, 0xC000_0000 + LOAD, TEXT, len(TEXT)), (LOAD + 0x10000, 0, b"DATA", 0x2004)]
    return make_elf32(segments, entry=entry, lead=multiboot_header(flags))


def read_info(memory) -> dict:
    names = ("flags", "mem_lower", "mem_upper", "boot_device", "cmdline", "mods_count")
    values = struct.unpack_from("<7I", memory.read(MULTIBOOT_INFO_AREA.base, 28))
    info = dict(zip((*names, "mods_addr"), values, strict=True))
    info["mmap_length"], info["mmap_addr"] = struct.unpack(
        "<II", memory.read(MULTIBOOT_INFO_AREA.base + 44, 8)
    )
    (info["boot_loader_name"],) = struct.unpack("<I", memory.read(MULTIBOOT_INFO_AREA.base + 64, 4))
    return info


def c_string(memory, address: int) -> str:
    data = memory.read(address, 256)
    return data[: data.index(0)].decode()


# -- the header -------------------------------------------------------------------------------


def test_header_is_found_at_any_aligned_offset_in_the_first_8_kib():
    for offset in (0, 4, 0x100, 8192 - 12):
        image = bytes(offset) + multiboot_header(0x3) + bytes(64)
        header = find_header(image)
        assert header is not None and header.offset == offset and header.flags == 0x3


def test_headers_unaligned_past_8_kib_or_with_a_bad_checksum_are_not_headers():
    assert find_header(bytes(2) + multiboot_header(0)) is None
    assert find_header(bytes(8192 - 8) + multiboot_header(0)) is None
    assert find_header(multiboot_header(0x3, checksum=0)) is None
    valid_later = multiboot_header(0x3, checksum=1) + multiboot_header(0x2)
    assert find_header(valid_later).offset == 12


@pytest.mark.parametrize(
    ("flags", "message"),
    [(1 << 2, "video mode"), (1 << 5, "does not know: 0x20"), (1 << 15, "0x8000")],
)
def test_requirements_kvmlet_cannot_meet_are_refused(flags, message):
    with pytest.raises(KvmletError, match=message):
        find_header(multiboot_header(flags))


def test_optional_flags_kvmlet_does_not_know_are_ignored():
    assert find_header(multiboot_header(0x3 | 1 << 20)).flags == 0x3 | 1 << 20


def test_address_fields_cut_short_are_refused():
    with pytest.raises(KvmletError, match="address fields are missing"):
        find_header(multiboot_header(1 << 16) + bytes(8))


# -- the image --------------------------------------------------------------------------------


def test_kludge_image_is_loaded_from_the_header_with_its_bss():
    image = parse_image(make_multiboot_kludge(TEXT, prefix=b"P" * 64, bss=0x3000))
    (segment,) = image.segments
    assert segment.file_offset == 64  # the header's offset minus (header_addr - load_addr)
    assert segment.address == LOAD and segment.file_size == 32 + len(TEXT)
    assert segment.memory_size == 32 + len(TEXT) + 0x3000
    assert image.entry == LOAD + 0x30


def test_kludge_load_end_zero_means_the_rest_of_the_file():
    header = multiboot_header(1 << 16, (LOAD, LOAD, 0, 0, LOAD))
    (segment,) = parse_image(b"X" * 16 + header + TEXT).segments
    assert segment.file_offset == 16 and segment.file_size == len(header) + len(TEXT)
    assert segment.memory_size == segment.file_size


@pytest.mark.parametrize(
    ("addresses", "message"),
    [
        ((LOAD, LOAD + 4, LOAD + 64, 0, LOAD), "load_addr lies above header_addr"),
        ((LOAD + 0x100, LOAD, 0, 0, LOAD), "reaches before the file"),
        ((LOAD, LOAD, LOAD - 1, 0, LOAD), "load_end_addr lies below load_addr"),
        ((LOAD, LOAD, LOAD + (1 << 20), 0, LOAD), "shorter than"),
        ((LOAD, LOAD, LOAD + 32, LOAD + 16, LOAD), "bss_end_addr lies below"),
        ((LOAD, LOAD, LOAD + 32, 0, LOAD + 32), "entry point 0x200020 lies outside"),
        ((LOAD, LOAD, LOAD, 0, LOAD), "empty image"),
    ],
)
def test_inconsistent_kludge_headers_are_one_line_errors(addresses, message):
    with pytest.raises(KvmletError, match=message):
        parse_image(multiboot_header(1 << 16, addresses) + TEXT)


def test_elf32_segments_go_to_their_physical_addresses_and_a_virtual_entry_is_translated():
    image = parse_image(elf32_kernel(entry=0xC000_0000 + LOAD + 0x10))
    assert [(s.address, s.memory_size) for s in image.segments] == [
        (LOAD, len(TEXT)),
        (LOAD + 0x10000, 0x2004),
    ]
    assert image.entry == LOAD + 0x10
    assert image.end == LOAD + 0x12004


def test_elf64_with_a_multiboot_header_loads_as_multiboot():
    segments = [(LOAD, LOAD, multiboot_header(0x3) + TEXT, 4096)]
    image = parse_image(make_elf(segments, entry=LOAD + 12))
    assert image.entry == LOAD + 12 and image.segments[0].file_size == 12 + len(TEXT)


@pytest.mark.parametrize(
    ("image", "message"),
    [
        (multiboot_header(0x3) + TEXT, "not ELF and its header has no address fields"),
        (make_elf32([], entry=0, lead=multiboot_header(0)), "no loadable segment"),
        (make_elf32([(LOAD, 0, TEXT, 16)], entry=LOAD, lead=multiboot_header(0)), "corrupt"),
        (make_elf32([(LOAD, LOAD, TEXT, 4096)], entry=16, lead=multiboot_header(0)), "outside"),
        (
            make_elf32([(LOAD, 0, TEXT, 4096)], entry=LOAD, machine=40, lead=multiboot_header(0)),
            "not an i386 ELF32",
        ),
    ],
    ids=["raw", "no-segment", "filesz>memsz", "entry", "arm"],
)
def test_malformed_images_are_one_line_errors(image, message):
    with pytest.raises(KvmletError, match=message):
        parse_image(image)


# -- loading, modules and the information structure -------------------------------------------


def test_loading_writes_segments_bss_modules_and_the_information_structure(memory, memory_map):
    memory.fill(LOAD + 0x10000, 0x3000, 0xAA)  # the bss must come out zeroed
    modules = [Module(b"first module", "mod1 alpha"), Module(b"M" * 5000, "mod2")]
    state = load_multiboot(memory, elf32_kernel(), memory_map, "kernel exit=3", modules)

    assert state.mode == "protected32" and state.entry == LOAD
    assert state.rax == BOOTLOADER_MAGIC and state.rbx == MULTIBOOT_INFO_AREA.base
    assert state.code_selector == CODE32_SELECTOR
    assert memory.read(LOAD, len(TEXT)) == TEXT
    assert memory.read(LOAD + 0x10000, 4) == b"DATA"
    assert memory.read(LOAD + 0x10004, 0x2000) == bytes(0x2000)

    info = read_info(memory)
    assert info["flags"] == (
        INFO_MEMORY | INFO_CMDLINE | INFO_MODULES | INFO_MEMORY_MAP | INFO_BOOT_LOADER_NAME
    )
    assert info["mem_lower"] == 639
    assert info["mem_upper"] == (64 * MiB - 1 * MiB) // 1024
    assert c_string(memory, info["cmdline"]) == "kernel exit=3"
    assert CMDLINE_AREA.contains(info["cmdline"])
    assert c_string(memory, info["boot_loader_name"]) == "kvmlet"

    assert info["mods_count"] == 2
    entries = [
        struct.unpack("<IIII", memory.read(info["mods_addr"] + 16 * index, 16))
        for index in range(2)
    ]
    first_start = -(-(LOAD + 0x12004) // PAGE_SIZE) * PAGE_SIZE  # after the bss, page aligned
    assert entries[0][:2] == (first_start, first_start + 12)
    assert entries[1][0] == first_start + PAGE_SIZE and entries[1][1] == entries[1][0] + 5000
    assert memory.read(entries[0][0], 12) == b"first module"
    assert [c_string(memory, entry[2]) for entry in entries] == ["mod1 alpha", "mod2"]
    assert [entry[3] for entry in entries] == [0, 0]


def test_memory_map_lists_the_e820_ranges_with_their_size_fields(memory, memory_map):
    load_multiboot(memory, elf32_kernel(), memory_map, "")
    info = read_info(memory)
    entries = [
        struct.unpack("<IQQI", memory.read(info["mmap_addr"] + offset, 24))
        for offset in range(0, info["mmap_length"], 24)
    ]
    expected = [(20, e.address, e.size, int(e.type)) for e in memory_map.e820()]
    assert entries == expected
    assert info["mods_count"] == 0 and not info["flags"] & INFO_MODULES


def test_high_ram_is_in_the_memory_map_but_mem_upper_stops_at_the_hole():
    memory_map = MemoryMap(3584 * MiB)  # 3 GiB below the hole, 512 MiB from 4 GiB
    memory = GuestMemory.anonymous(memory_map.ram_banks())
    try:
        load_multiboot(memory, elf32_kernel(), memory_map, "")
        info = read_info(memory)
        last = struct.unpack("<IQQI", memory.read(info["mmap_addr"] + info["mmap_length"] - 24, 24))
    finally:
        memory.close()
    assert info["mem_upper"] == (3072 - 1) * 1024
    assert last == (20, 4 << 30, 512 * MiB, 1)


def test_modules_that_do_not_fit_are_refused(memory_map):
    with pytest.raises(KvmletError, match=r"module 2 .* does not fit"):
        place_modules(LOAD, [4096, 64 * MiB], memory_map)


def test_a_kernel_below_1_mib_or_beyond_ram_is_refused(memory, memory_map):
    low = make_elf32([(0x8000, 0, TEXT, 4096)], entry=0x8000, lead=multiboot_header(0))
    with pytest.raises(KvmletError, match="outside the guest's low RAM"):
        load_multiboot(memory, low, memory_map, "")
    high = make_multiboot_kludge(TEXT, load=63 * MiB, bss=2 * MiB)
    with pytest.raises(KvmletError, match="outside the guest's low RAM"):
        load_multiboot(memory, high, memory_map, "")


def test_strings_with_a_nul_or_too_long_are_refused(memory, memory_map):
    with pytest.raises(KvmletError, match="NUL"):
        load_multiboot(memory, elf32_kernel(), memory_map, "a\0b")
    with pytest.raises(KvmletError, match="multiboot strings exceed"):
        load_multiboot(memory, elf32_kernel(), memory_map, "x" * CMDLINE_AREA.size)


# -- through load_kernel and inspect_kernel ---------------------------------------------------


def test_load_kernel_boots_a_kludge_kernel_with_module_files(tmp_path, memory, memory_map):
    kernel = tmp_path / "test.bin"
    kernel.write_bytes(make_multiboot_kludge(TEXT))
    module = tmp_path / "data.txt"
    module.write_bytes(b"payload")
    state = load_kernel(
        memory,
        kernel,
        None,
        "cmd",
        memory_map,
        cpus=1,
        modules=[BootModule(module, "key=value"), BootModule(module)],
    )
    assert state.rax == BOOTLOADER_MAGIC and state.entry == LOAD + 0x30
    info = read_info(memory)
    strings = [c_string(memory, memory.read_u32(info["mods_addr"] + 16 * i + 8)) for i in (0, 1)]
    assert strings == [f"{module} key=value", str(module)]
    assert memory.read(0xF0000, 4) == b"_MP_"  # the MP table is there for SMP test kernels


def test_inspect_kernel_names_multiboot_and_refuses_what_cannot_boot(tmp_path):
    kernel = tmp_path / "k"
    kernel.write_bytes(elf32_kernel())
    info = inspect_kernel(kernel)
    assert info.format == "multiboot" and info.boot_method("auto") == "multiboot"
    with pytest.raises(KvmletError, match="multiboot-only kernel cannot boot with pvh"):
        info.boot_method("pvh")
    kernel.write_bytes(make_elf32([(LOAD, 0, TEXT, 4096)], entry=LOAD))
    with pytest.raises(KvmletError, match="32-bit ELF kernel needs a multiboot header"):
        inspect_kernel(kernel)
    kernel.write_bytes(multiboot_header(0x3, checksum=5) + TEXT)
    with pytest.raises(KvmletError, match="bad checksum"):
        inspect_kernel(kernel)


def test_modules_with_a_linux_kernel_and_an_initrd_with_multiboot_are_refused(
    tmp_path, memory, memory_map
):
    linux = tmp_path / "vmlinux"
    linux.write_bytes(make_elf([(16 * MiB, 16 * MiB, TEXT, 4096)], entry=16 * MiB))
    with pytest.raises(KvmletError, match="multiboot kernels only"):
        load_kernel(memory, linux, None, "", memory_map, 1, modules=[BootModule(linux)])
    kernel = tmp_path / "mb"
    kernel.write_bytes(elf32_kernel())
    with pytest.raises(KvmletError, match="not an initrd"):
        load_kernel(memory, kernel, linux, "", memory_map, 1)
    with pytest.raises(KvmletError, match="cannot read multiboot module"):
        load_kernel(memory, kernel, None, "", memory_map, 1, modules=[BootModule(tmp_path)])


# -- fuzzing ----------------------------------------------------------------------------------

u32 = st.integers(0, 0xFFFF_FFFF)


@given(
    prefix=st.binary(max_size=64).map(lambda data: data[: len(data) // 4 * 4]),
    flags=u32,
    addresses=st.tuples(u32, u32, u32, u32, u32),
    tail=st.binary(max_size=256),
)
def test_header_parser_never_fails_other_than_with_a_kvmlet_error(prefix, flags, addresses, tail):
    """Any header (valid checksum, any flags and address fields) yields a consistent image or
    one KvmletError: segments inside the file, entry inside the loaded range."""
    data = prefix + multiboot_header(flags, addresses) + tail
    try:
        image = parse_image(data)
    except KvmletError as error:
        assert "\n" not in str(error)
        return
    for segment in image.segments:
        assert 0 <= segment.file_offset <= segment.file_offset + segment.file_size <= len(data)
        assert segment.file_size <= segment.memory_size
    assert any(s.address <= image.entry < s.end for s in image.segments)


@given(st.binary(max_size=9000))
def test_arbitrary_bytes_are_never_a_crash(data):
    try:
        find_header(data)
        parse_image(data)
    except KvmletError:
        pass
