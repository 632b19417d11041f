"""bzImage: setup-header parsing, loading at 1 MiB, the zero page and its setup_data."""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvmlet.boot import load_kernel
from kvmlet.boot.bzimage import load_bzimage, parse_setup_header
from kvmlet.boot.memory_map import CMDLINE_AREA, MemoryMap, MiB
from kvmlet.errors import KvmletError
from kvmlet.memory import GuestMemory
from tests.unit.boot.synthetic_kernels import make_bzimage

PAYLOAD = bytes(range(256)) * 64


def test_header_fields_are_read():
    header = parse_setup_header(make_bzimage(PAYLOAD, setup_sects=0, init_size=5 * MiB))
    assert header.version == 0x020F and header.version_text == "2.15"
    assert header.setup_sects == 4  # 0 means 4
    assert header.protected_mode_offset == 5 * 512
    assert header.syssize == len(PAYLOAD) // 16
    assert header.init_size == 5 * MiB
    assert header.pref_address == 16 * MiB
    assert header.cmdline_size == 2047
    assert header.initrd_addr_max == 0x7FFF_FFFF
    assert header.relocatable and header.kernel_alignment == 2 * MiB
    assert header.raw[0x202 - 0x1F1 : 0x206 - 0x1F1] == b"HdrS"
    assert len(header.raw) == 0x26C - 0x1F1


BAD_IMAGES = [
    (b"", "not a Linux kernel"),
    (b"MZ" + bytes(4094), "not a Linux kernel"),
    (make_bzimage()[:0x204], "not a Linux kernel"),
    (make_bzimage(version=0x020A), r"boot protocol 2\.10 is too old"),
    (make_bzimage(xloadflags=0), "32-bit only"),
    (make_bzimage()[:0x240], "setup header is cut short"),
    (make_bzimage(PAYLOAD)[: 5 * 512 + 100], "protected-mode kernel is cut short"),
    (make_bzimage(b""), "protected-mode kernel is cut short"),
    (make_bzimage(kernel_alignment=3 * MiB), "not a power of two"),
]


@pytest.mark.parametrize(("image", "message"), BAD_IMAGES, ids=[m for _, m in BAD_IMAGES])
def test_bad_images_give_one_clear_error(image, message):
    with pytest.raises(KvmletError, match=message):
        parse_setup_header(image)


def test_header_length_byte_is_bounded():
    image = bytearray(make_bzimage())
    image[0x201] = 0xFF  # header would run past the zero page's header area
    with pytest.raises(KvmletError, match="impossible length"):
        parse_setup_header(bytes(image))


def test_protected_mode_kernel_lands_at_1mib(memory, memory_map):
    loaded = load_bzimage(memory, make_bzimage(PAYLOAD, init_size=8 * MiB), memory_map)
    assert memory.read(0x100000, len(PAYLOAD)) == PAYLOAD
    assert loaded.entry == 0x100200
    assert loaded.kernel_end == 16 * MiB + 8 * MiB  # decompresses at pref_address


def test_non_relocatable_kernel_runs_at_pref_address(memory, memory_map):
    image = make_bzimage(PAYLOAD, relocatable=False, pref_address=32 * MiB, init_size=MiB)
    assert load_bzimage(memory, image, memory_map).kernel_end == 33 * MiB


def test_kernel_needing_more_ram_than_the_guest_has(memory, memory_map):
    with pytest.raises(KvmletError, match="give it more memory"):
        load_bzimage(memory, make_bzimage(init_size=60 * MiB), memory_map)


def _boot(memory, memory_map, tmp_path, image, cmdline="console=ttyS0", initrd=None):
    kernel = tmp_path / "bzImage"
    kernel.write_bytes(image)
    initrd_path = None
    if initrd is not None:
        initrd_path = tmp_path / "initrd"
        initrd_path.write_bytes(initrd)
    return load_kernel(memory, kernel, initrd_path, cmdline, memory_map, cpus=2)


def test_zero_page_fields_at_documented_offsets(memory, memory_map, tmp_path):
    initrd = b"\x07" * 10000
    state = _boot(memory, memory_map, tmp_path, make_bzimage(PAYLOAD), initrd=initrd)
    assert state.mode == "long64" and state.entry == 0x100200
    zero_page = state.rsi
    assert zero_page == 0x7000
    read = memory.read
    assert read(zero_page + 0x202, 4) == b"HdrS"  # setup header copied in
    assert memory.read_u16(zero_page + 0x206) == 0x020F
    assert memory.read_u16(zero_page + 0x1FE) == 0xAA55
    assert read(zero_page + 0x26C, 4) == bytes(4)  # nothing past the header's end
    assert memory.read_u8(zero_page + 0x210) == 0xFF  # type_of_loader
    assert memory.read_u8(zero_page + 0x211) == 0x81  # CAN_USE_HEAP | LOADED_HIGH kept
    assert memory.read_u16(zero_page + 0x224) == 0xFE00  # heap_end_ptr
    cmd_line_ptr = memory.read_u32(zero_page + 0x228)
    assert cmd_line_ptr == CMDLINE_AREA.base
    assert read(cmd_line_ptr, 14) == b"console=ttyS0\0"
    ramdisk_image = memory.read_u32(zero_page + 0x218)
    assert memory.read_u32(zero_page + 0x21C) == len(initrd)
    assert read(ramdisk_image, len(initrd)) == initrd
    assert memory.read_u8(zero_page + 0x1E8) == 3  # e820_entries
    table = [
        struct.unpack_from("<QQI", read(zero_page + 0x2D0 + 20 * index, 20)) for index in range(3)
    ]
    assert table == [(e.address, e.size, e.type) for e in memory_map.e820()]


def test_setup_data_carries_a_fresh_rng_seed(memory, memory_map, tmp_path):
    seeds = []
    for _ in range(2):
        state = _boot(memory, memory_map, tmp_path, make_bzimage())
        setup_data = memory.read_u64(state.rsi + 0x250)
        assert setup_data != 0
        next_entry, entry_type, length = struct.unpack("<QII", memory.read(setup_data, 16))
        assert (next_entry, entry_type, length) == (0, 9, 32)  # SETUP_RNG_SEED, 32 bytes
        seeds.append(memory.read(setup_data + 16, 32))
    assert seeds[0] != seeds[1]


def test_initrd_is_high_page_aligned_and_below_the_limits(memory, memory_map, tmp_path):
    initrd = b"\x01" * 5000
    image = make_bzimage(initrd_addr_max=48 * MiB - 1)
    state = _boot(memory, memory_map, tmp_path, image, initrd=initrd)
    address = memory.read_u32(state.rsi + 0x218)
    assert address % 4096 == 0
    assert address + len(initrd) <= 48 * MiB
    assert address >= 48 * MiB - 4096 - len(initrd)  # as high as it can go
    assert address >= 16 * MiB + 4 * MiB  # clear of the kernel's decompression buffer


def test_initrd_that_does_not_fit(memory, memory_map, tmp_path):
    with pytest.raises(KvmletError, match="does not fit"):
        _boot(memory, memory_map, tmp_path, make_bzimage(), initrd=b"\0" * 50 * MiB)


def test_command_line_limited_by_cmdline_size(memory, memory_map, tmp_path):
    image = make_bzimage(cmdline_size=16)
    _boot(memory, memory_map, tmp_path, image, cmdline="x" * 16)
    with pytest.raises(KvmletError, match="at most 16"):
        _boot(memory, memory_map, tmp_path, image, cmdline="x" * 17)


def test_pvh_requested_for_a_bzimage(memory, memory_map, tmp_path):
    kernel = tmp_path / "bzImage"
    kernel.write_bytes(make_bzimage())
    with pytest.raises(KvmletError, match="PVH boot needs an uncompressed ELF"):
        load_kernel(memory, kernel, None, "", memory_map, cpus=1, boot_method="pvh")


VALID = make_bzimage(PAYLOAD[:512])


@st.composite
def mutated_images(draw):
    image = bytearray(VALID[: draw(st.integers(0, len(VALID)))])
    for _ in range(draw(st.integers(0, 8))):
        if image:
            image[draw(st.integers(0, len(image) - 1))] = draw(st.integers(0, 255))
    return bytes(image)


@settings(max_examples=300, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(image=st.one_of(st.binary(max_size=4096), mutated_images()))
def test_fuzzed_images_load_or_fail_cleanly(image):
    memory = GuestMemory.anonymous(MemoryMap(32 * MiB).ram_banks())
    try:
        loaded = load_bzimage(memory, image, MemoryMap(32 * MiB))
    except KvmletError:
        return
    finally:
        memory.close()
    assert loaded.kernel_end <= 32 * MiB
