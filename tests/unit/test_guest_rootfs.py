"""kvmlet's root-file-system initramfs: packing and caching, its init script, and the one line
a guest that stopped before its command gets."""

from __future__ import annotations

import shutil
import subprocess

import pytest
from test_cpio import read_newc

from kvmlet.errors import KvmletError
from kvmlet.guest import rootfs
from kvmlet.guest.initramfs import BUSYBOX_PATH
from kvmlet.guest.progress import QuietProgress

INIT = rootfs.INIT_SCRIPT_PATH.read_text()


def test_the_init_script_is_valid_shell():
    subprocess.run(["sh", "-n", str(rootfs.INIT_SCRIPT_PATH)], check=True)


@pytest.mark.skipif(not BUSYBOX_PATH.is_file(), reason="no static busybox on this host")
def test_the_initramfs_is_packed_once_into_its_own_cache_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("KVMLET_CACHE_DIR", str(tmp_path))
    initrd = rootfs.ensure_rootfs_initramfs(QuietProgress())
    assert initrd.parent.parent == tmp_path / rootfs.CACHE_FOLDER
    assert initrd.parent == rootfs.current_dir()
    entries = {entry["name"]: entry for entry in read_newc(initrd.read_bytes())}
    assert entries["init"]["data"] == INIT.encode()
    assert entries["bin/busybox"]["data"] == BUSYBOX_PATH.read_bytes()
    stamp = initrd.stat().st_mtime_ns
    assert rootfs.ensure_rootfs_initramfs(QuietProgress()) == initrd
    assert initrd.stat().st_mtime_ns == stamp


def test_a_missing_busybox_is_one_line(tmp_path):
    with pytest.raises(KvmletError, match="busybox-static"):
        rootfs.ensure_rootfs_initramfs(busybox=tmp_path / "absent")


@pytest.mark.parametrize(
    ("console", "expected"),
    [
        ("boot...\r\nkvmlet-init: the guest kernel lacks: CONFIG_9P_FS (see)\r\n", "CONFIG_9P_FS"),
        ("Kernel panic - not syncing: VFS: Unable to mount root fs", "CONFIG_BLK_DEV_INITRD"),
        ("Failed to execute /init (error -8)", "CONFIG_BINFMT_SCRIPT"),
        ("", "CONFIG_SERIAL_8250_CONSOLE"),
    ],
)
def test_a_boot_that_stopped_early_is_explained_in_one_line(console, expected):
    explanation = rootfs.explain_boot_failure(console)
    assert expected in explanation and "\n" not in explanation


def test_an_ordinary_console_explains_nothing():
    assert rootfs.explain_boot_failure("Linux version 6.1\nRun /init as init process\n") is None


def test_the_kernel_check_names_each_option_stage_one_needs():
    for option in ("CONFIG_9P_FS", "CONFIG_NET_9P_VIRTIO", "CONFIG_DEVTMPFS", "CONFIG_OVERLAY_FS"):
        assert option in INIT


@pytest.mark.skipif(shutil.which("busybox") is None, reason="no busybox on this host")
def test_the_kernel_check_reports_what_a_kernel_lacks(tmp_path):
    """The check run with busybox against a fake /proc and /sys that have no 9p and no
    overlay: exactly those are named."""
    proc = tmp_path / "proc"
    sys = tmp_path / "sys"
    proc.mkdir()
    (proc / "filesystems").write_text("nodev\ttmpfs\nnodev\tdevtmpfs\n")
    (proc / "cmdline").write_text("root=x\n")
    (sys / "bus/virtio/devices/virtio0").mkdir(parents=True)
    (sys / "bus/virtio/drivers/9pnet_virtio").mkdir(parents=True)
    function = INIT[INIT.index("missing_kernel_options() {") : INIT.index("stage1() {")]
    script = function.replace("/proc/", f"{proc}/").replace("/sys/", f"{sys}/")
    found = subprocess.run(
        ["busybox", "sh", "-c", script + "missing_kernel_options overlay"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert found == ["CONFIG_9P_FS", "CONFIG_OVERLAY_FS"]
