"""The kernel vhost frontend without /dev/vhost-*: its structures and ioctl numbers against the
real <linux/vhost.h> (gcc), and the errors a user meets.
tests/linux/test_kernel_vhost_in_guest.py drives a real vhost-vsock in the test box."""

from __future__ import annotations

import ctypes
import os

import pytest

from kvmlet.errors import KvmletError
from kvmlet.vhost import kernel_abi as abi
from kvmlet.vhost.frontend import VhostError
from kvmlet.vhost.kernel import KernelVhostNet, KernelVhostVsock
from tests.helpers.c_header import probe_c_header

SIZES = {
    "vhost_vring_state": abi.VhostVringState,
    "vhost_vring_file": abi.VhostVringFile,
    "vhost_vring_addr": abi.VhostVringAddr,
    "vhost_memory_region": abi.VhostMemoryRegion,
    "vhost_memory": abi.VhostMemory,
}
OFFSETS = {
    "vhost_vring_addr.desc_user_addr": abi.VhostVringAddr.desc_user_addr.offset,
    "vhost_vring_addr.used_user_addr": abi.VhostVringAddr.used_user_addr.offset,
    "vhost_vring_addr.avail_user_addr": abi.VhostVringAddr.avail_user_addr.offset,
    "vhost_memory.regions": ctypes.sizeof(abi.VhostMemory),
}
NUMBERS = sorted(name for name in dir(abi) if name.startswith("VHOST_") and name != "VHOST_VIRTIO")


@pytest.fixture(scope="module")
def header_values(tmp_path_factory) -> dict[str, int]:
    directory = tmp_path_factory.mktemp("vhosth")
    return probe_c_header(directory, "linux/vhost.h", SIZES, OFFSETS, NUMBERS, signed=True)


@pytest.mark.parametrize("name", SIZES)
def test_structure_size_matches_vhost_h(header_values, name):
    assert ctypes.sizeof(SIZES[name]) == header_values[f"sizeof {name}"]


@pytest.mark.parametrize("name", OFFSETS)
def test_field_offset_matches_vhost_h(header_values, name):
    assert OFFSETS[name] == header_values[f"offset {name}"]


@pytest.mark.parametrize("name", NUMBERS)
def test_ioctl_number_and_constant_match_vhost_h(header_values, name):
    assert getattr(abi, name) == header_values[f"value {name}"], f"{name}"


def test_a_memory_table_carries_its_regions():
    table = abi.memory_with(3)
    assert ctypes.sizeof(table) == 8 + 3 * 32
    assert abi.memory_with(3) is table


def test_a_missing_vhost_device_is_one_line_with_what_to_do(tmp_path):
    missing = str(tmp_path / "vhost-vsock")
    with pytest.raises(KvmletError, match=r"^cannot open .*: no such file or directory \(load"):
        KernelVhostVsock(3, path=missing)
    with pytest.raises(VhostError, match=r"modprobe vhost_net\)$"):
        KernelVhostNet(-1, path=missing)


def test_a_file_that_is_not_vhost_is_refused_and_closed():
    before = len(os.listdir("/proc/self/fd"))
    with pytest.raises(VhostError, match=r"^vhost-vsock: VHOST_SET_OWNER failed: inappropriate"):
        KernelVhostVsock(3, path="/dev/null")
    assert len(os.listdir("/proc/self/fd")) == before
