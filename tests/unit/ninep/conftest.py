"""Fixtures for the 9p server tests: a share next to files it must never reach.

`Tree` lays out, in a temporary directory, `share/` (what the server is given) and `outside/`
(siblings it must not see): a secret file whose contents must never appear in a reply, a
directory, and symlinks inside the share pointing out of it, absolutely and relatively.
`snapshot()` records everything outside the share (type, mode, size, mtime, inode, contents or
link target) so a test can check nothing there was created, changed or removed.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from kvmlet.ninep import Server
from tests.helpers.ninep_client import NinePClient

SECRET = b"SECRET-7f3a9c-never-leaves-the-host"


class Tree:
    """A share and what lies around it."""

    def __init__(self, base: Path):
        self.base = base
        self.share = base / "share"
        self.outside = base / "outside"
        self.outside.mkdir()
        (self.outside / "secret").write_bytes(SECRET)
        (self.outside / "dir").mkdir()
        (self.outside / "dir" / "secret2").write_bytes(SECRET + b"-2")
        self.share.mkdir()
        (self.share / "file").write_bytes(b"inside")
        (self.share / "sub").mkdir()
        (self.share / "sub" / "inner").write_bytes(b"inner file")
        os.symlink(self.outside / "secret", self.share / "abs_link")
        os.symlink("../outside/secret", self.share / "rel_link")
        os.symlink("../outside", self.share / "dir_link")
        os.symlink("../../outside/dir", self.share / "sub" / "deep_link")
        os.symlink(self.outside / "created_by_guest", self.share / "dangling")
        os.symlink("/proc/self/root", self.share / "proc_link")
        self.before = self.snapshot()

    def snapshot(self) -> dict[str, tuple]:
        """Everything under base except the share: path -> what it is and holds."""
        result = {}
        for directory, names, files in os.walk(self.base):
            if Path(directory) == self.base:
                names[:] = [name for name in names if name != "share"]
            for name in names + files:
                path = Path(directory) / name
                status = path.lstat()
                if stat.S_ISLNK(status.st_mode):
                    content = os.readlink(path)
                elif stat.S_ISREG(status.st_mode):
                    content = path.read_bytes()
                else:
                    content = None
                result[str(path.relative_to(self.base))] = (
                    status.st_mode,
                    status.st_size,
                    status.st_mtime_ns,
                    status.st_ino,
                    content,
                )
        return result

    def assert_outside_untouched(self) -> None:
        assert self.snapshot() == self.before


def open_fds() -> set[int]:
    return {int(name) for name in os.listdir("/proc/self/fd")}


def assert_no_secret(client: NinePClient) -> None:
    for reply in client.replies:
        assert SECRET not in reply
        assert SECRET[:16] not in reply


@pytest.fixture
def tree(tmp_path):
    tree = Tree(tmp_path)
    yield tree
    tree.assert_outside_untouched()


@pytest.fixture
def server(tree):
    """A server over tree.share; at the end, every descriptor it opened is closed."""
    before = open_fds()
    server = Server(str(tree.share))
    yield server
    server.close()
    assert server.internal_errors == 0
    assert open_fds() <= before


@pytest.fixture
def client(server):
    client = NinePClient(server).mount()
    yield client
    assert_no_secret(client)
