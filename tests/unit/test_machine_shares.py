"""9p shares in the machine's wiring: the --9p and --rootfs options, the kernel parameters of a
9p root, the fid budget, and a virtio-9p device per share serving its directory."""

from __future__ import annotations

import os
import resource

import pytest

from kvmlet.errors import KvmletError
from kvmlet.machine import shares
from kvmlet.machine.config import MachineConfig, ShareConfig
from kvmlet.memory import GuestMemory
from kvmlet.ninep import Server


def test_a_share_option_names_its_directory_tag_and_mode():
    assert shares.parse_share_option("/srv/data", 2) == ShareConfig("/srv/data", "share2")
    assert shares.parse_share_option("/srv,tag=src,ro") == ShareConfig("/srv", "src", True)
    assert shares.parse_share_option("/srv,ro,tag=x") == ShareConfig("/srv", "x", True)


@pytest.mark.parametrize("text", ["", ",ro", "/srv,tag=", "/srv,rw", "/srv,ro=1", "/srv,cache"])
def test_a_malformed_share_option_is_one_line(text):
    with pytest.raises(KvmletError, match="--9p"):
        shares.parse_share_option(text)


def test_a_rootfs_option_is_a_directory_and_maybe_rw():
    assert shares.parse_rootfs_option("/") == ("/", False)
    assert shares.parse_rootfs_option("/srv/root,rw") == ("/srv/root", True)
    for text in ("", ",rw", "/x,ro", "/x,rw,rw"):
        with pytest.raises(KvmletError, match="--rootfs"):
            shares.parse_rootfs_option(text)


def test_machine_config_refuses_two_shares_with_one_tag():
    with pytest.raises(KvmletError, match="tags must differ"):
        MachineConfig(shares=(ShareConfig("/a", "t"), ShareConfig("/b", "t")))


def test_root_parameters_mount_the_tag_read_only_with_the_cache_or_read_write_without():
    read_only = shares.root_parameters("r")
    assert read_only[:2] == ["root=r", "rootfstype=9p"]
    assert "cache=loose" in read_only[2] and read_only[-1] == "ro"
    writable = shares.root_parameters("r", read_only=False)
    assert "cache=loose" not in writable[2] and writable[-1] == "rw"
    assert "trans=virtio" in writable[2] and "version=9p2000.L" in writable[2]


def test_fids_are_an_equal_part_of_the_spare_descriptors_within_bounds():
    assert shares.fids_per_share(512 + 3 * 1000, 1) == 1000
    assert shares.fids_per_share(512 + 3 * 1000, 2) == 500
    assert shares.fids_per_share(600, 1) == shares.MIN_FIDS
    assert shares.fids_per_share(1 << 40, 1) == shares.MAX_FIDS


def test_the_open_file_limit_is_raised_to_the_hard_limit():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, 256), hard))
        raised = shares.raise_open_file_limit()
        assert raised == resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        assert raised >= min(hard, shares._nr_open()) or hard == resource.RLIM_INFINITY
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_each_share_becomes_a_9p_device_with_its_tag_and_mode(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    memory = GuestMemory.anonymous([(0, 1 << 20)])
    own = Server(os.fspath(tmp_path / "b"))
    configs = (ShareConfig(tmp_path / "a", "first", True), ShareConfig(None, "own", server=own))
    devices = shares.share_devices(configs, memory)
    try:
        assert [device.tag for device in devices] == ["first", "own"]
        assert devices[0].server.share.read_only
        assert devices[1].server is own
    finally:
        for device in devices:
            device.close()


def test_a_directory_that_cannot_be_shared_is_one_line_and_closes_what_was_built(tmp_path):
    memory = GuestMemory.anonymous([(0, 1 << 20)])
    (tmp_path / "ok").mkdir()
    closed = []

    class Recording(Server):
        def close(self):
            closed.append(self)
            super().close()

    first = Recording(os.fspath(tmp_path / "ok"))
    with pytest.raises(KvmletError):
        shares.share_devices(
            (ShareConfig(None, "ok", server=first), ShareConfig(tmp_path / "missing", "gone")),
            memory,
        )
    assert closed == [first]
    with pytest.raises(KvmletError, match="give a directory or a server"):
        shares.share_devices((ShareConfig(None, "none"),), memory)
