"""The vhost devices' options: --fs, -d vhost-user=, --vsock, --mem-backend, --virtiofsd, as
the command line spells them and as MachineConfig checks them."""

from __future__ import annotations

import pytest

from kvmlet import cli
from kvmlet.errors import KvmletError
from kvmlet.machine.config import MachineConfig
from kvmlet.machine.vhost_config import (
    FilesystemConfig,
    VhostUserDiskConfig,
    parse_fs_option,
    parse_vhost_user_disk,
    shareable_memory,
)
from tests.unit.boot.synthetic_kernels import make_bzimage
from tests.unit.test_cli import assert_one_line_error, run_cli


def test_fs_options(tmp_path):
    assert parse_fs_option(str(tmp_path), 0) == FilesystemConfig("fs0", str(tmp_path))
    assert parse_fs_option(f"{tmp_path},tag=data,ro", 3) == FilesystemConfig(
        "data", str(tmp_path), read_only=True
    )
    assert parse_fs_option("socket=/run/v.sock,tag=t", 1) == FilesystemConfig(
        "t", None, socket="/run/v.sock"
    )
    assert parse_fs_option(f"{tmp_path},tag={'x' * 36}", 0).tag == "x" * 36


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("", "name a host directory"),
        ("/tmp,rw", "unknown option 'rw'"),
        ("/tmp,tag=", "1 to 36 bytes"),
        ("/tmp,tag=" + "x" * 37, "1 to 36 bytes"),
        ("socket=/run/v.sock", "needs tag=TAG"),
        ("socket=/run/v.sock,tag=t,ro", "a running virtiofsd decides"),
        ("socket=,tag=t", "name a host directory"),
    ],
)
def test_fs_option_mistakes(text, fragment):
    with pytest.raises(KvmletError, match=fragment):
        parse_fs_option(text, 0)


def test_vhost_user_disk_options():
    assert parse_vhost_user_disk("vhost-user=/run/b.sock") == VhostUserDiskConfig("/run/b.sock")
    assert parse_vhost_user_disk("vhost-user=b.sock,ro") == VhostUserDiskConfig("b.sock", True)
    with pytest.raises(KvmletError, match="name the backend's socket"):
        parse_vhost_user_disk("vhost-user=,ro")
    with pytest.raises(KvmletError, match="unknown flag 'direct'"):
        parse_vhost_user_disk("vhost-user=b.sock,direct")


def test_guest_ram_is_a_memfd_exactly_when_asked_or_needed(tmp_path):
    share = (FilesystemConfig("t", str(tmp_path)),)
    disk = (VhostUserDiskConfig("b.sock"),)
    assert not shareable_memory(MachineConfig(boot_code=b""))
    assert not shareable_memory(MachineConfig(boot_code=b"", vsock_cid=3)), "kernel vhost"
    assert shareable_memory(MachineConfig(boot_code=b"", filesystems=share))
    assert shareable_memory(MachineConfig(boot_code=b"", vhost_user_disks=disk))
    assert shareable_memory(MachineConfig(boot_code=b"", mem_backend="memfd"))
    with pytest.raises(KvmletError, match="use --mem-backend memfd"):
        MachineConfig(boot_code=b"", mem_backend="anon", vhost_user_disks=disk)


@pytest.mark.parametrize(
    ("fields", "fragment"),
    [
        ({"vsock_cid": 2}, "--vsock 2: a guest's CID is 3 to 4294967294"),
        ({"vsock_cid": 1 << 32}, "a guest's CID"),
        ({"mem_backend": "hugetlb"}, "unknown memory backend"),
        ({"filesystems": (FilesystemConfig("a", "/nonexistent-dir"),)}, "not a directory"),
        (
            {"filesystems": (FilesystemConfig("a", "/"), FilesystemConfig("a", "/tmp"))},
            "two virtiofs shares have the tag 'a'",
        ),
    ],
)
def test_machine_config_refuses_what_cannot_work(fields, fragment):
    with pytest.raises(KvmletError, match=fragment):
        MachineConfig(boot_code=b"", **fields)


def test_run_options_reach_the_machine_config(tmp_path):
    kernel = tmp_path / "bzImage"
    kernel.write_bytes(make_bzimage())
    args = cli.build_parser().parse_args(
        [
            *("run", "-k", str(kernel), "-d", str(tmp_path / "a.img"), "-d", "vhost-user=b.sock"),
            *("-d", "vhost-user=c.sock,ro", "--fs", f"{tmp_path},ro", "--fs", "socket=s,tag=t"),
            *("--vsock", "0x10", "--virtiofsd", "/opt/virtiofsd", "--mem-backend", "memfd"),
        ]
    )
    config = cli.run_config(args)
    assert [disk.path for disk in config.disks] == [str(tmp_path / "a.img")]
    assert config.vhost_user_disks == (
        VhostUserDiskConfig("b.sock"),
        VhostUserDiskConfig("c.sock", read_only=True),
    )
    assert config.filesystems == (
        FilesystemConfig("fs0", str(tmp_path), read_only=True),
        FilesystemConfig("t", socket="s"),
    )
    assert (config.vsock_cid, config.virtiofsd, config.mem_backend) == (
        16,
        "/opt/virtiofsd",
        "memfd",
    )
    plain = cli.run_config(cli.build_parser().parse_args(["run", "-k", str(kernel)]))
    assert (plain.filesystems, plain.vsock_cid, plain.mem_backend) == ((), None, "auto")


def test_help_says_when_ram_is_a_memfd_and_option_mistakes_are_one_line(tmp_path):
    help_text = " ".join(run_cli("run", "--help").stdout.split())
    for fragment in ("--fs HOSTDIR[,tag=TAG][,ro]", "mount -t virtiofs TAG", "vhost-user=SOCKET"):
        assert fragment in help_text
    assert "memfd when a vhost-user device, --fs or -d vhost-user=, is configured" in help_text
    kernel = tmp_path / "bzImage"
    kernel.write_bytes(make_bzimage())
    result = run_cli("run", "-k", str(kernel), "--fs", str(tmp_path), "--mem-backend", "anon")
    assert_one_line_error(result, "use --mem-backend memfd")
    assert_one_line_error(run_cli("run", "-k", str(kernel), "--vsock", "x"), "not a context id")
