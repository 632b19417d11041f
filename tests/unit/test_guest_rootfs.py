"""kvmlet's root-file-system initramfs: packing and caching, its init script, and the one line
a guest that stopped before its command gets."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
from test_cpio import read_newc

from kvmlet.errors import KvmletError
from kvmlet.guest import rootfs
from kvmlet.guest.initramfs import BUSYBOX_PATH, GUEST_FILES
from kvmlet.guest.progress import QuietProgress

INIT = rootfs.INIT_SCRIPT_PATH.read_text()
UDHCPC_SCRIPT = GUEST_FILES["etc/udhcpc/default.script"]


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
    assert entries["etc/udhcpc/default.script"]["data"] == UDHCPC_SCRIPT.read_bytes()
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


def init_function(name: str, proc, sys, run=None) -> str:
    """Shell function `name` of the init, with `parameter`, on a fake /proc, /sys (and /run)."""
    text = INIT[INIT.index("parameter() {") : INIT.index("\n}\n", INIT.index("parameter() {")) + 3]
    text += INIT[INIT.index(f"{name}() {{") : INIT.index("\n}\n", INIT.index(f"{name}() {{")) + 3]
    text = text.replace("/proc/", f"{proc}/").replace("/sys/", f"{sys}/")
    return text.replace("/run/kvmlet", f"{run}") if run is not None else text


@pytest.mark.skipif(shutil.which("busybox") is None, reason="no busybox on this host")
@pytest.mark.parametrize(
    ("cmdline", "fstype", "expected"),
    [
        ("root=x", "9p", ["CONFIG_9P_FS", "CONFIG_OVERLAY_FS"]),
        ("root=x", "virtiofs", ["CONFIG_VIRTIO_FS", "CONFIG_OVERLAY_FS"]),
        (
            "root=x kvmlet.ctl=c",
            "virtiofs",
            ["CONFIG_9P_FS", "CONFIG_VIRTIO_FS", "CONFIG_OVERLAY_FS"],
        ),
    ],
)
def test_the_kernel_check_reports_what_a_kernel_lacks(tmp_path, cmdline, fstype, expected):
    """The check run with busybox against a fake /proc and /sys that have no 9p, no virtiofs
    and no overlay: exactly those the boot uses are named (9p for a 9p root and for the
    sandbox's control share)."""
    proc = tmp_path / "proc"
    sys = tmp_path / "sys"
    proc.mkdir()
    (proc / "filesystems").write_text("nodev\ttmpfs\nnodev\tdevtmpfs\n")
    (proc / "cmdline").write_text(cmdline + "\n")
    (sys / "bus/virtio/devices/virtio0").mkdir(parents=True)
    (sys / "bus/virtio/drivers/9pnet_virtio").mkdir(parents=True)
    script = init_function("missing_kernel_options", proc, sys)
    found = subprocess.run(
        ["busybox", "sh", "-c", script + f"missing_kernel_options overlay {fstype}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert found == expected


def fake_busybox(tmp_path):
    """A `$bb` that logs each call (with RESOLV_CONF and PATH) and succeeds."""
    log = tmp_path / "bb.log"
    bb = tmp_path / "bb"
    bb.write_text(f'#!/bin/sh\necho "${{RESOLV_CONF:-}}|${{PATH}}|$*" >> {log}\n')
    bb.chmod(0o755)
    return bb, log


@pytest.mark.skipif(shutil.which("busybox") is None, reason="no busybox on this host")
def test_the_shares_are_mounted_by_their_type(tmp_path):
    bb, log = fake_busybox(tmp_path)
    script = init_function("mount_shares", tmp_path, tmp_path)
    mounts = "virtiofs kvmletcwd /home/u/src 9p kvmletshare0 /data"
    subprocess.run(["busybox", "sh", "-c", f"bb={bb}\n{script}mount_shares {mounts}"], check=True)
    calls = [line.split("|")[2] for line in log.read_text().splitlines()]
    assert calls == [
        "mkdir -p /home/u/src",
        "mount -t virtiofs -o rw kvmletcwd /home/u/src",
        "mkdir -p /data",
        "mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000,cache=mmap kvmletshare0 /data",
    ]


@pytest.mark.skipif(shutil.which("busybox") is None, reason="no busybox on this host")
@pytest.mark.parametrize(
    ("mode", "nics", "resolver"),
    [("overlay", ["eth0", "eth1"], "/etc/resolv.conf"), ("rw", ["eth0"], "RUN/resolv.conf")],
)
def test_the_network_is_brought_up_with_dhcp_on_every_nic(tmp_path, mode, nics, resolver):
    """DHCP with the default guest's udhcpc script, its tools busybox's; a read-write root's
    resolver file is not the host's own."""
    bb, log = fake_busybox(tmp_path)
    proc, sys, run = tmp_path / "proc", tmp_path / "sys", tmp_path / "run"
    proc.mkdir()
    (proc / "cmdline").write_text(f"root=x kvmlet.rootfs={mode}\n")
    for nic in nics:
        (sys / "class/net" / nic).mkdir(parents=True)
    script = init_function("network_up", proc, sys, run)
    subprocess.run(["busybox", "sh", "-c", f"bb={bb}\n{script}network_up"], check=True)
    calls = [line.split("|") for line in log.read_text().splitlines()]
    resolver = resolver.replace("RUN", str(run))
    dhcp = [
        [resolver, f"{run}/bin", f"udhcpc -i {nic} -b -t 3 -T 1 -s {run}/udhcpc.script"]
        for nic in nics
    ]
    removal = [["", os.environ["PATH"], "rm -f /etc/resolv.conf"]] if mode == "overlay" else []
    assert calls == [["", os.environ["PATH"], "ip link set lo up"], *removal, *dhcp]


@pytest.mark.skipif(shutil.which("busybox") is None, reason="no busybox on this host")
def test_a_guest_without_a_nic_only_gets_its_loopback(tmp_path):
    bb, log = fake_busybox(tmp_path)
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc/cmdline").write_text("root=x\n")
    script = init_function("network_up", tmp_path / "proc", tmp_path / "sys", tmp_path / "run")
    subprocess.run(["busybox", "sh", "-c", f"bb={bb}\n{script}network_up"], check=True)
    assert [line.split("|")[2] for line in log.read_text().splitlines()] == ["ip link set lo up"]


def test_the_initramfs_carries_udhcpcs_script_for_the_network():
    assert "cp /etc/udhcpc/default.script $new/run/kvmlet/udhcpc.script" in INIT
