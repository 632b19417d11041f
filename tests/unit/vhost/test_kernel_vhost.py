"""The kernel vhost frontend without /dev/vhost-*: its structures and ioctl numbers against the
real <linux/vhost.h> (gcc), and the errors a user meets.
tests/linux/test_kernel_vhost_in_guest.py drives a real vhost-vsock in the test box."""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess

import pytest

from kvmlet.errors import KvmletError
from kvmlet.vhost import kernel_abi as abi
from kvmlet.vhost.frontend import VhostError
from kvmlet.vhost.kernel import KernelVhostNet, KernelVhostVsock

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
    if shutil.which("gcc") is None:
        pytest.skip("gcc is not installed")
    lines = ["#include <stdio.h>", "#include <stddef.h>", "#include <linux/vhost.h>"]
    lines.append("int main(void) {")
    for name in SIZES:
        lines.append(f'printf("sizeof {name} %zu\\n", sizeof(struct {name}));')
    for name in OFFSETS:
        struct_name, _, member = name.partition(".")
        lines.append(f'printf("offset {name} %zu\\n", offsetof(struct {struct_name}, {member}));')
    for name in NUMBERS:
        lines.append(f'printf("value {name} %lld\\n", (long long)({name}));')
    lines.append("return 0; }")
    source = tmp_path_factory.mktemp("vhosth") / "probe.c"
    source.write_text("\n".join(lines))
    binary = source.with_suffix("")
    subprocess.run(["gcc", "-o", str(binary), str(source)], check=True, capture_output=True)
    output = subprocess.run([str(binary)], check=True, capture_output=True, text=True).stdout
    return {
        f"{kind} {name}": int(value) for kind, name, value in map(str.split, output.splitlines())
    }


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
