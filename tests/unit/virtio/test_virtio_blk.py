"""virtio-blk over a raw image: data path, flush, id, discard, read-only, locking, options."""

from __future__ import annotations

import os
import struct

import pytest

from kvmlet.errors import KvmletError
from kvmlet.memory import GuestMemory
from kvmlet.virtio.blk import (
    MAX_TRANSFER,
    SECTOR_SIZE,
    VIRTIO_BLK_F_DISCARD,
    VIRTIO_BLK_F_RO,
    VIRTIO_BLK_F_WRITE_ZEROES,
    VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES,
    VirtioBlock,
)
from kvmlet.virtio.blk_config import DiskConfig, parse_disk_option
from tests.helpers.virtio_driver import MockDriver

IMAGE_SECTORS = 64


def pattern(length: int, seed: int = 0) -> bytes:
    return bytes((seed + i * 7) & 0xFF for i in range(length))


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "disk.img"
    path.write_bytes(pattern(IMAGE_SECTORS * SECTOR_SIZE))
    return path


@pytest.fixture
def make_disk(memory):
    devices = []

    def make(path, **flags):
        device = VirtioBlock(memory, DiskConfig(str(path), **flags))
        devices.append(device)
        driver = MockDriver(device, memory, 0x1000, 3 << 20)
        driver.initialize()
        return device, driver

    yield make
    for device in devices:
        device.close()


def request(driver, request_type, sector=0, data=b"", in_size=0, indirect=False, flat=False):
    """Post one request and run it; returns (status, data read, used length)."""
    header = struct.pack("<IIQ", request_type, 0, sector)
    if flat:
        out, sizes = [header + data], [in_size + 1]
    else:
        out = [header] + ([data] if data else [])
        sizes = ([in_size] if in_size else []) + [1]
    head, addresses = driver.post_data(0, out, sizes, indirect)
    driver.kick(0)
    (completion,) = driver.collect(0)
    assert completion.head == head
    memory = driver.memory
    if flat:
        body = memory.read(addresses[0], in_size + 1)
        return body[-1], body[:-1], completion.length
    status = memory.read_u8(addresses[-1])
    read = memory.read(addresses[0], in_size) if in_size else b""
    return status, read, completion.length


def test_config_space_reports_capacity_limits_and_features(image, make_disk):
    device, _ = make_disk(image)
    assert device.read_config(0, 8) == IMAGE_SECTORS
    assert device.read_config(12, 4) == 254
    assert device.read_config(20, 4) == SECTOR_SIZE
    assert not device.negotiated(VIRTIO_BLK_F_RO)
    assert device.negotiated(VIRTIO_BLK_F_DISCARD) and device.negotiated(VIRTIO_BLK_F_WRITE_ZEROES)
    assert device.read_config(36, 4) > 0 and device.read_config(56, 1) == 1


@pytest.mark.parametrize("layout", ["separate", "indirect", "flat"])
def test_read_returns_image_bytes(image, make_disk, layout):
    _, driver = make_disk(image)
    status, data, used = request(
        driver,
        VIRTIO_BLK_T_IN,
        sector=3,
        in_size=2048,
        indirect=layout == "indirect",
        flat=layout == "flat",
    )
    assert status == VIRTIO_BLK_S_OK
    assert data == image.read_bytes()[3 * SECTOR_SIZE : 7 * SECTOR_SIZE]
    assert used == 2049


def test_write_reaches_the_file_before_completion(image, make_disk):
    device, driver = make_disk(image)
    payload = pattern(1024, seed=99)
    status, _, used = request(driver, VIRTIO_BLK_T_OUT, sector=10, data=payload)
    assert (status, used) == (VIRTIO_BLK_S_OK, 1)
    assert image.read_bytes()[10 * SECTOR_SIZE : 12 * SECTOR_SIZE] == payload
    status, _, _ = request(driver, VIRTIO_BLK_T_OUT, sector=12, data=payload, flat=True)
    assert status == VIRTIO_BLK_S_OK
    assert image.read_bytes()[12 * SECTOR_SIZE : 14 * SECTOR_SIZE] == payload
    assert device.stats()["queues"][0]["requests"] == 2


def test_flush_is_fdatasync(image, make_disk, monkeypatch):
    device, driver = make_disk(image)
    synced = []
    monkeypatch.setattr(os, "fdatasync", synced.append)
    assert request(driver, VIRTIO_BLK_T_FLUSH)[0] == VIRTIO_BLK_S_OK
    assert synced == [device.image.fd]


def test_get_id_returns_the_serial(image, memory):
    device = VirtioBlock(memory, DiskConfig(str(image)), serial="serial-0123456789abcdefXYZ")
    try:
        driver = MockDriver(device, memory, 0x1000, 1 << 20)
        driver.initialize()
        status, data, used = request(driver, VIRTIO_BLK_T_GET_ID, in_size=20)
        assert (status, data, used) == (VIRTIO_BLK_S_OK, b"serial-0123456789abc", 21)
        status, data, _ = request(driver, VIRTIO_BLK_T_GET_ID, in_size=8)
        assert (status, data) == (VIRTIO_BLK_S_OK, b"serial-0")
    finally:
        device.close()


@pytest.mark.parametrize(
    ("request_type", "sector", "data", "in_size"),
    [
        (VIRTIO_BLK_T_IN, IMAGE_SECTORS - 1, b"", 1024),
        (VIRTIO_BLK_T_IN, 2**63, b"", 512),
        (VIRTIO_BLK_T_IN, 0, b"", 100),
        (VIRTIO_BLK_T_OUT, IMAGE_SECTORS, b"x" * 512, 0),
        (VIRTIO_BLK_T_OUT, 0, b"x" * 10, 0),
    ],
)
def test_out_of_range_or_misaligned_transfers_fail_with_ioerr(
    image, make_disk, request_type, sector, data, in_size
):
    _, driver = make_disk(image)
    before = image.read_bytes()
    status, _, used = request(driver, request_type, sector, data, in_size)
    assert (status, used) == (VIRTIO_BLK_S_IOERR, 1)
    assert image.read_bytes() == before


def test_transfers_beyond_seg_max_times_size_max_fail(tmp_path):
    path = tmp_path / "big.img"
    path.write_bytes(b"")
    os.truncate(path, 2 * MAX_TRANSFER)
    memory = GuestMemory.anonymous([(0, MAX_TRANSFER + (2 << 20))])
    device = VirtioBlock(memory, DiskConfig(str(path)))
    try:
        driver = MockDriver(device, memory, 0x1000, memory.size - 0x1000)
        driver.initialize()
        header = driver.allocate(16)
        memory.write(header, struct.pack("<IIQ", VIRTIO_BLK_T_IN, 0, 0))
        data, status = driver.allocate(MAX_TRANSFER + 512), driver.allocate(1)
        driver.post(0, [(header, 16)], [(data, MAX_TRANSFER + 512), (status, 1)])
        driver.kick(0)
        assert driver.collect(0)[0].length == 1
        assert memory.read_u8(status) == VIRTIO_BLK_S_IOERR
    finally:
        device.close()


def test_unknown_request_type_is_unsupported(image, make_disk):
    _, driver = make_disk(image)
    assert request(driver, 0x77, in_size=512)[0] == VIRTIO_BLK_S_UNSUPP


def test_malformed_requests_are_failed_not_fatal(image, make_disk):
    _, driver = make_disk(image)
    _, (status_address,) = driver.post_data(0, [b"short"], [1])
    driver.kick(0)
    assert driver.collect(0)[0].length == 1
    assert driver.memory.read_u8(status_address) == VIRTIO_BLK_S_IOERR
    driver.post_data(0, [struct.pack("<IIQ", VIRTIO_BLK_T_IN, 0, 0)], [])
    driver.kick(0)
    assert driver.collect(0)[0].length == 0, "no writable byte: nowhere to put a status"
    assert not driver.needs_reset


def test_read_only_disk_refuses_writes_with_ioerr(image, make_disk):
    device, driver = make_disk(image, read_only=True)
    assert device.negotiated(VIRTIO_BLK_F_RO)
    assert not device.device_features >> VIRTIO_BLK_F_DISCARD & 1
    before = image.read_bytes()
    status, _, _ = request(driver, VIRTIO_BLK_T_OUT, sector=0, data=b"y" * 512)
    assert status == VIRTIO_BLK_S_IOERR
    assert image.read_bytes() == before
    assert request(driver, VIRTIO_BLK_T_IN, in_size=512)[1] == before[:512]


def ranges(*segments):
    return b"".join(struct.pack("<QII", *segment) for segment in segments)


def test_discard_punches_holes_and_write_zeroes_zeroes(image, make_disk):
    _, driver = make_disk(image)
    status, _, _ = request(driver, VIRTIO_BLK_T_DISCARD, data=ranges((8, 8, 0)))
    assert status == VIRTIO_BLK_S_OK
    content = image.read_bytes()
    assert content[8 * SECTOR_SIZE : 16 * SECTOR_SIZE] == bytes(8 * SECTOR_SIZE)
    assert content[: 8 * SECTOR_SIZE] == pattern(IMAGE_SECTORS * SECTOR_SIZE)[: 8 * SECTOR_SIZE]
    data = ranges((20, 2, 0), (30, 1, 1))
    assert request(driver, VIRTIO_BLK_T_WRITE_ZEROES, data=data)[0] == VIRTIO_BLK_S_OK
    content = image.read_bytes()
    assert content[20 * SECTOR_SIZE : 22 * SECTOR_SIZE] == bytes(2 * SECTOR_SIZE)
    assert content[30 * SECTOR_SIZE : 31 * SECTOR_SIZE] == bytes(SECTOR_SIZE)
    assert content[22 * SECTOR_SIZE + 1] != 0 and len(content) == IMAGE_SECTORS * SECTOR_SIZE


@pytest.mark.parametrize(
    ("request_type", "data", "expected"),
    [
        (VIRTIO_BLK_T_DISCARD, ranges((0, 1, 1)), VIRTIO_BLK_S_UNSUPP),
        (VIRTIO_BLK_T_WRITE_ZEROES, ranges((0, 1, 4)), VIRTIO_BLK_S_UNSUPP),
        (VIRTIO_BLK_T_DISCARD, ranges((IMAGE_SECTORS, 1, 0)), VIRTIO_BLK_S_IOERR),
        (VIRTIO_BLK_T_DISCARD, ranges((0, 1, 0))[:10], VIRTIO_BLK_S_IOERR),
        (VIRTIO_BLK_T_DISCARD, ranges(*[(0, 1, 0)] * 33), VIRTIO_BLK_S_IOERR),
    ],
)
def test_bad_discard_and_write_zeroes_requests(image, make_disk, request_type, data, expected):
    _, driver = make_disk(image)
    before = image.read_bytes()
    assert request(driver, request_type, data=data)[0] == expected
    assert image.read_bytes() == before


@pytest.mark.parametrize("guest_offset", [0, 8])
@pytest.mark.parametrize("sector", [8, 3])
def test_direct_io_round_trips_aligned_and_unaligned_transfers(
    image, make_disk, guest_offset, sector
):
    device, driver = make_disk(image, direct=True)
    assert device.read_config(20, 4) == 4096
    driver.allocate(1, 4096)
    driver.allocate(guest_offset, 1)
    payload = pattern(8192, seed=5)
    assert request(driver, VIRTIO_BLK_T_OUT, sector=sector, data=payload)[0] == VIRTIO_BLK_S_OK
    offset = sector * SECTOR_SIZE
    assert image.read_bytes()[offset : offset + 8192] == payload
    driver.allocate(1, 4096)
    driver.allocate(guest_offset, 1)
    status, data, _ = request(driver, VIRTIO_BLK_T_IN, sector=sector, in_size=8192)
    assert (status, data) == (VIRTIO_BLK_S_OK, payload)


def test_missing_image_is_a_clear_error(tmp_path, memory):
    with pytest.raises(KvmletError, match=r"cannot open disk image .*nope\.img: No such file"):
        VirtioBlock(memory, DiskConfig(str(tmp_path / "nope.img")))


def test_a_writable_image_is_locked_against_a_second_monitor(image, memory):
    first = VirtioBlock(memory, DiskConfig(str(image)))
    try:
        with pytest.raises(KvmletError, match="locked by another process"):
            VirtioBlock(memory, DiskConfig(str(image)))
        with pytest.raises(KvmletError, match="locked by another process"):
            VirtioBlock(memory, DiskConfig(str(image), read_only=True))
    finally:
        first.close()
    readers = [VirtioBlock(memory, DiskConfig(str(image), read_only=True)) for _ in range(2)]
    with pytest.raises(KvmletError, match="locked"):
        VirtioBlock(memory, DiskConfig(str(image)))
    for reader in readers:
        reader.close()


def test_parse_disk_option():
    assert parse_disk_option("/a/b.img") == DiskConfig("/a/b.img")
    assert parse_disk_option("x.img,ro,direct") == DiskConfig("x.img", True, True)
    with pytest.raises(KvmletError, match="unknown flag 'rw'"):
        parse_disk_option("x.img,rw")
    with pytest.raises(KvmletError, match="missing image path"):
        parse_disk_option(",ro")
