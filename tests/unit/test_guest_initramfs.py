"""The default guest's initramfs (busybox, applet links, /init) and its init script."""

from __future__ import annotations

import os
import shutil
import stat
import struct
import subprocess

import pytest
from test_cpio import read_newc

from kvmlet.errors import KvmletError
from kvmlet.guest import initramfs
from kvmlet.guest.initramfs import (
    INIT_SCRIPT_PATH,
    initramfs_cache_key,
    is_static_elf,
    pack_initramfs,
)
from kvmlet.guest.progress import QuietProgress

INIT_SCRIPT = INIT_SCRIPT_PATH.read_text()


def elf_with_program_headers(*types: int) -> bytes:
    """A minimal 64-bit little-endian ELF header followed by program headers of these types."""
    header = bytearray(64)
    header[:6] = b"\x7fELF\x02\x01"
    struct.pack_into("<QQIHHH", header, 0x20, 64, 0, 0, 64, 56, len(types))
    return bytes(header) + b"".join(struct.pack("<I52x", kind) for kind in types)


def test_static_elf_detection():
    assert is_static_elf(elf_with_program_headers(1, 1))
    assert not is_static_elf(elf_with_program_headers(1, 3))  # PT_INTERP: dynamic
    assert not is_static_elf(b"#!/bin/sh\n" + bytes(64))
    assert not is_static_elf(elf_with_program_headers(1)[:-20] + b"")  # truncated table


def test_archive_has_console_busybox_init_and_applets():
    image = pack_initramfs(b"BUSYBOX", ["bin/sh", "sbin/reboot", "usr/bin/awk", "linuxrc"], "x")
    entries = {e["name"]: e for e in read_newc(image)}
    assert entries["init"]["data"] == b"x" and entries["init"]["mode"] & 0o111
    assert entries["bin/busybox"]["data"] == b"BUSYBOX"
    console = entries["dev/console"]
    assert stat.S_ISCHR(console["mode"]) and (console["rdevmajor"], console["rdevminor"]) == (5, 1)
    for applet in ("bin/sh", "sbin/reboot", "usr/bin/awk", "linuxrc"):
        assert entries[applet]["data"] == b"/bin/busybox"
    assert stat.S_ISDIR(entries["proc"]["mode"]) and stat.S_ISDIR(entries["root"]["mode"])


def test_packing_is_deterministic():
    assert pack_initramfs(b"B", ["bin/sh"], "x") == pack_initramfs(b"B", ["bin/sh"], "x")


def test_cache_key_follows_busybox_and_init():
    key = initramfs_cache_key(b"busybox", INIT_SCRIPT)
    assert key != initramfs_cache_key(b"busybox2", INIT_SCRIPT)
    assert key != initramfs_cache_key(b"busybox", INIT_SCRIPT + "\n")


def test_dynamic_busybox_is_refused(tmp_path):
    fake = tmp_path / "busybox"
    fake.write_bytes(elf_with_program_headers(3))
    with pytest.raises(KvmletError, match="busybox-static"):
        initramfs.ensure_initramfs(QuietProgress(), busybox=fake)
    with pytest.raises(KvmletError, match="busybox-static"):
        initramfs.ensure_initramfs(QuietProgress(), busybox=tmp_path / "absent")


def test_init_script_is_valid_shell():
    subprocess.run(["sh", "-n", str(INIT_SCRIPT_PATH)], check=True)


def test_init_script_mounts_prints_marker_and_runs_or_shells():
    for needed in (
        "mount -t proc proc /proc",
        "mount -t sysfs sysfs /sys",
        "mount -t devtmpfs devtmpfs /dev",
        'echo "kvmlet-guest: ready"',
        "kvmlet.run=*",
        "base64 -d",
        'echo "kvmlet-exit: $?"',
        "setsid cttyhack sh",
        "reboot -f",
    ):
        assert needed in INIT_SCRIPT


@pytest.mark.skipif(shutil.which("busybox") is None, reason="no busybox on this host")
def test_init_script_run_mode_under_busybox(tmp_path):
    """Runs the command-decoding part of init with busybox sh: output, then the exit marker."""
    from kvmlet.guest.run_protocol import parse_exit_status, run_parameter

    cmdline = tmp_path / "cmdline"
    parameter = run_parameter('echo "hello guest"; exit 7')
    cmdline.write_text(f"console=ttyS0 {parameter} quiet\n")
    decode_part = INIT_SCRIPT[INIT_SCRIPT.index("run_command=") : INIT_SCRIPT.index("else")]
    script = decode_part.replace("/proc/cmdline", str(cmdline)).replace("cd /root", "cd /")
    output = subprocess.run(
        ["busybox", "sh", "-c", script + "fi\n"], capture_output=True, check=True
    ).stdout
    assert output.startswith(b"kvmlet-guest: ready\nhello guest\n")
    assert parse_exit_status(output) == 7


def test_guest_files_go_into_the_archive_and_its_cache_key():
    files = initramfs.guest_files()
    assert set(files) == {"etc/udhcpc/default.script"}
    image = pack_initramfs(b"B", ["bin/sh"], "x", files)
    entry = {e["name"]: e for e in read_newc(image)}["etc/udhcpc/default.script"]
    assert entry["data"] == files["etc/udhcpc/default.script"] and entry["mode"] & 0o111
    key = initramfs_cache_key(b"busybox", INIT_SCRIPT, files)
    assert key != initramfs_cache_key(b"busybox", INIT_SCRIPT)
    changed = {"etc/udhcpc/default.script": b"#!/bin/sh\n"}
    assert key != initramfs_cache_key(b"busybox", INIT_SCRIPT, changed)


def test_init_asks_for_a_lease_on_every_nic_unless_the_kernel_configured_one():
    network = INIT_SCRIPT[
        INIT_SCRIPT.index("ip link set lo up") : INIT_SCRIPT.index("run_command=")
    ]
    assert '*" ip="*) ;;' in network and "/sys/class/net/eth*" in network
    assert 'udhcpc -i "${interface##*/}" -b' in network
    assert INIT_SCRIPT.index("ip link set lo up") < INIT_SCRIPT.index('echo "kvmlet-guest: ready"')


def isolated_shell() -> list[str] | None:
    """A POSIX shell that runs `ip` from PATH (busybox sh would run its own applet) and, as
    root, in a private network namespace: a script under test never reaches the host's
    interfaces. None when neither is to be had."""
    shell = shutil.which("dash")
    if shell is None:
        return None
    if os.geteuid() != 0:
        return [shell]  # without privilege `ip` can change nothing anyway
    unshare = shutil.which("unshare")
    return [unshare, "--net", shell] if unshare else None


@pytest.mark.skipif(isolated_shell() is None, reason="needs dash (and unshare(1) as root)")
def test_udhcpc_script_puts_the_lease_on_the_interface(tmp_path):
    """The event script with an `ip` that only writes down what it is told."""
    fake_ip = tmp_path / "bin" / "ip"
    fake_ip.parent.mkdir()
    fake_ip.write_text(f'#!/bin/sh\necho "$*" >>{tmp_path}/ip.log\n')
    fake_ip.chmod(0o755)
    script = initramfs.GUEST_FILES["etc/udhcpc/default.script"]
    lease = {
        "interface": "eth0",
        "ip": "192.0.2.15",
        "mask": "24",
        "router": "192.0.2.2 192.0.2.1",
        "dns": "192.0.2.3 192.0.2.4",
        "domain": "example.org",
        "mtu": "65520",
    }
    environment = {"PATH": f"{fake_ip.parent}:/usr/bin:/bin", "RESOLV_CONF": str(tmp_path / "r")}
    for event in ("deconfig", "bound"):
        subprocess.run(
            [*isolated_shell(), str(script), event], env={**environment, **lease}, check=True
        )
    assert (tmp_path / "ip.log").read_text().splitlines() == [
        "-4 addr flush dev eth0",
        "link set eth0 up",
        "-4 addr show dev eth0",
        "-4 addr flush dev eth0",
        "addr add 192.0.2.15/24 dev eth0",
        "link set eth0 mtu 65520",
        "route del default dev eth0",
        "route add default via 192.0.2.2 dev eth0",
    ]
    assert (tmp_path / "r").read_text() == (
        "search example.org\nnameserver 192.0.2.3\nnameserver 192.0.2.4\n"
    )
