"""How a host directory the guest boots from is shared: virtiofs where a virtiofsd can run for
this user, else 9p; forced either way; the configuration and kernel parameters of each."""

from __future__ import annotations

import pytest

from kvmlet.errors import KvmletError
from kvmlet.machine import file_transport, shares
from kvmlet.machine.config import MachineConfig, ShareConfig
from kvmlet.machine.vhost_config import FilesystemConfig, shareable_memory


def usable(program, read_only=()):
    return None


def absent(program, read_only=()):
    return "virtiofsd not found: install it with `apt-get install qemu-system-common`"


def unusable(program, read_only=()):
    return "virtiofsd's sandbox needs namespaces this user cannot make here (EPERM)"


@pytest.mark.parametrize(
    ("via", "problem", "kind"),
    [
        ("auto", usable, "virtiofs"),
        ("auto", absent, "9p"),
        ("auto", unusable, "9p"),
        ("9p", usable, "9p"),
        ("9p", absent, "9p"),
        ("virtiofs", usable, "virtiofs"),
    ],
)
def test_auto_takes_virtiofs_where_it_can_run_and_either_can_be_forced(via, problem, kind):
    chosen = file_transport.choose_file_transport(via, problem=problem, euid=0)
    assert chosen.kind == kind
    line = chosen.summary()
    assert "\n" not in line and line.startswith(f"host directories over {kind}: ")
    if via == "auto" and kind == "9p":
        assert problem(None) in line, "the fallback says why virtiofs was not taken"


def test_auto_takes_9p_for_a_normal_user_whose_virtiofsd_cannot_run_programs_yet():
    chosen = file_transport.choose_file_transport("auto", problem=usable, euid=1000)
    assert chosen.kind == "9p" and "EPERM" in chosen.summary()
    forced = file_transport.choose_file_transport("virtiofs", problem=usable, euid=1000)
    assert forced.kind == "virtiofs"


@pytest.mark.parametrize("problem", [absent, unusable])
def test_forced_virtiofs_that_cannot_run_is_one_line(problem):
    with pytest.raises(KvmletError, match="--rootfs-via virtiofs: virtiofsd"):
        file_transport.choose_file_transport("virtiofs", problem=problem)


def test_the_daemon_asked_for_is_the_one_probed():
    asked = []
    file_transport.choose_file_transport(
        "auto", "/opt/virtiofsd", lambda *probe: asked.append(probe), read_only=["/"]
    )
    assert asked == [("/opt/virtiofsd", ["/"])]


def test_an_unknown_way_is_one_line():
    with pytest.raises(KvmletError, match="use auto, 9p or virtiofs"):
        file_transport.choose_file_transport("nfs", problem=usable)


def test_only_an_unprivileged_virtiofsd_makes_the_sandbox_command_guest_root():
    assert file_transport.command_runs_as_root("virtiofs", euid=1000)
    assert not file_transport.command_runs_as_root("virtiofs", euid=0)
    assert not file_transport.command_runs_as_root("9p", euid=1000)


def test_host_directories_become_9p_shares_or_virtiofs_filesystems(tmp_path):
    base = MachineConfig(shares=(ShareConfig(tmp_path, "mine"),))
    directories = [("a", tmp_path, True), ("b", tmp_path, False)]
    ninep = file_transport.with_host_directories(base, "9p", directories)
    assert ninep.shares == (
        ShareConfig(tmp_path, "a", True),
        ShareConfig(tmp_path, "b", False),
        ShareConfig(tmp_path, "mine"),
    )
    assert not ninep.filesystems and not shareable_memory(ninep)
    virtiofs = file_transport.with_host_directories(base, "virtiofs", directories)
    assert virtiofs.shares == base.shares
    assert virtiofs.filesystems == (
        FilesystemConfig("a", source=tmp_path, read_only=True),
        FilesystemConfig("b", source=tmp_path, read_only=False),
    )
    assert shareable_memory(virtiofs), "virtiofsd maps guest RAM: it must be in memfds"


def test_the_root_parameters_name_the_type_the_init_mounts():
    assert file_transport.root_parameters("virtiofs", "r") == [
        "root=r",
        "rootfstype=virtiofs",
        "ro",
    ]
    assert file_transport.root_parameters("virtiofs", "r", read_only=False)[-1] == "rw"
    assert file_transport.root_parameters("9p", "r") == shares.root_parameters("r")


@pytest.mark.parametrize("kind", ["9p", "virtiofs"])
@pytest.mark.parametrize("writable", [False, True])
def test_a_root_share_over_either_boots_kvmlets_init_and_is_described(
    tmp_path, monkeypatch, kind, writable
):
    monkeypatch.setattr("kvmlet.guest.rootfs.ensure_rootfs_initramfs", lambda p: tmp_path / "i")
    config = shares.with_root_share(MachineConfig(), tmp_path, writable, transport=kind)
    assert config.initrd == tmp_path / "i"
    assert f"rootfstype={kind}" in config.extra_parameters
    mode = "rw" if writable else "overlay"
    assert config.extra_parameters[-1] == f"kvmlet.rootfs={mode}"
    assert file_transport.root_filesystem(config, shares.ROOT_TAG) == {
        "type": kind,
        "path": str(tmp_path),
        "read_only": not writable,
    }
    assert file_transport.root_filesystem(MachineConfig(), shares.ROOT_TAG) is None
