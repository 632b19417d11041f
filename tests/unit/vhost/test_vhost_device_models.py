"""The three devices on the vhost frontends, without a guest: virtio-fs (its configuration
space and queues), vhost-user-blk (configuration and queue count from the backend, read-only)
and vsock (one line when the host has no vhost-vsock)."""

from __future__ import annotations

import socket
import struct

import pytest

from kvmlet.memory import GuestMemory
from kvmlet.vhost import user_protocol as wire
from kvmlet.vhost.blk import (
    NUM_QUEUES_OFFSET,
    VIRTIO_BLK_F_MQ,
    VIRTIO_BLK_F_RO,
    vhost_user_blk_device,
)
from kvmlet.vhost.frontend import VhostError
from kvmlet.vhost.fs import fs_config, virtiofs_device
from kvmlet.vhost.user import VhostUserFrontend
from kvmlet.vhost.vsock import vsock_device
from tests.helpers.vhost_user_backend import ALL_PROTOCOL_FEATURES, BLK_FEATURES, PythonBackend
from tests.helpers.virtio_driver import GUEST_RAM_SIZE


@pytest.fixture
def memory():
    ram = GuestMemory.memfd([(0, GUEST_RAM_SIZE)])
    yield ram
    ram.close()


@pytest.fixture
def connect():
    """A frontend on a Python backend made with the given options."""
    backends = []

    def make(**options):
        ours, theirs = socket.socketpair()
        backends.append(PythonBackend(theirs, **options).start())
        return VhostUserFrontend(ours, name="backend", timeout=2)

    yield make
    for backend in backends:
        backend.stop()


def test_the_fs_tag_fills_its_field_padded_and_unterminated():
    assert fs_config("data", 1) == b"data" + bytes(32) + struct.pack("<I", 1)
    assert fs_config("t" * 36, 3)[:36] == b"t" * 36
    for bad in ("", "t" * 37, "a\0b"):
        with pytest.raises(ValueError):
            fs_config(bad, 1)


def test_virtiofs_has_a_high_priority_queue_and_its_own_config(memory, connect):
    device = virtiofs_device(memory, connect(queue_num=2), "share")
    try:
        assert device.device_id == 26
        assert device.queue_count == 2 and device.backend_queues == 2
        config = bytes(device.read_config(i, 1) for i in range(40))
        assert config == fs_config("share", 1)
    finally:
        device.close()


def test_a_daemon_serving_fewer_queues_than_the_share_needs_is_refused(memory, connect):
    frontend = connect(queue_num=1)
    with pytest.raises(VhostError, match="serves 1 queues, the device needs 2"):
        virtiofs_device(memory, frontend, "share")
    frontend.close()


def blk_config(num_queues: int) -> bytes:
    config = bytearray(range(64))
    config[NUM_QUEUES_OFFSET : NUM_QUEUES_OFFSET + 2] = num_queues.to_bytes(2, "little")
    return bytes(config)


def test_a_disk_has_as_many_queues_as_the_backends_config_says_with_mq(memory, connect):
    multi = vhost_user_blk_device(
        memory,
        connect(features=BLK_FEATURES | 1 << VIRTIO_BLK_F_MQ, queue_num=4, config=blk_config(3)),
    )
    single = vhost_user_blk_device(memory, connect(queue_num=4, config=blk_config(3)))
    try:
        assert (multi.device_id, multi.queue_count, single.queue_count) == (2, 3, 1)
        assert multi.device_features >> VIRTIO_BLK_F_MQ & 1
        assert bytes(multi.read_config(i, 1) for i in range(8)) == bytes(range(8)), "GET_CONFIG"
    finally:
        multi.close()
        single.close()


def test_a_read_only_disk_tells_the_driver(memory, connect):
    writable = vhost_user_blk_device(memory, connect())
    read_only = vhost_user_blk_device(memory, connect(), read_only=True)
    try:
        assert not writable.device_features >> VIRTIO_BLK_F_RO & 1
        assert read_only.device_features >> VIRTIO_BLK_F_RO & 1
    finally:
        writable.close()
        read_only.close()


def test_a_disk_backend_without_a_configuration_space_is_refused(memory, connect):
    frontend = connect(protocol_features=ALL_PROTOCOL_FEATURES & ~(1 << wire.PROTOCOL_F_CONFIG))
    with pytest.raises(VhostError, match="gives no configuration space"):
        vhost_user_blk_device(memory, frontend)
    frontend.close()


def test_a_host_without_vhost_vsock_is_one_line(memory, tmp_path):
    with pytest.raises(VhostError, match=r"cannot open .*no such file.*modprobe vhost_vsock"):
        vsock_device(memory, 3, path=str(tmp_path / "vhost-vsock"))
