"""The default guest's initramfs (busybox, applet links, /init) and its init script."""

from __future__ import annotations

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
