"""A read-only share answers EROFS to everything that would change it, and reads as usual."""

from __future__ import annotations

import errno
import stat

import pytest

from kvmlet.ninep import Server
from kvmlet.ninep import messages as m
from tests.helpers.ninep_client import ROOT, NinePClient, errno_of


def share_state(tree) -> dict:
    result = {}
    for path in sorted(tree.share.rglob("*")):
        status = path.lstat()
        content = path.read_bytes() if stat.S_ISREG(status.st_mode) else None
        result[str(path)] = (status.st_mode, status.st_mtime_ns, status.st_ctime_ns, content)
    return result


@pytest.fixture
def read_only(tree):
    server = Server(str(tree.share), read_only=True)
    client = NinePClient(server).mount()
    before = share_state(tree)
    yield client
    assert share_state(tree) == before
    server.close()
    assert server.internal_errors == 0


def changes(client):
    file_fid = client.walk_new(b"file")
    every_setattr = (
        m.SETATTR_MODE,
        m.SETATTR_UID,
        m.SETATTR_GID,
        m.SETATTR_SIZE,
        m.SETATTR_ATIME,
        m.SETATTR_MTIME | m.SETATTR_MTIME_SET,
    )
    yield from (
        m.Tsetattr(0, file_fid, valid, 0o777, 0, 0, 0, 1, 0, 1, 0) for valid in every_setattr
    )
    yield from (
        m.Tlopen(0, client.walk_new(b"file"), flags)
        for flags in (m.L_WRONLY, m.L_RDWR, m.L_RDONLY | m.L_TRUNC)
    )
    yield m.Tlcreate(0, client.walk_new(), b"new", m.L_RDWR, 0o644, 0)
    yield m.Tlcreate(0, client.walk_new(), b"file", m.L_RDONLY, 0o644, 0)
    yield m.Tmkdir(0, ROOT, b"dir", 0o755, 0)
    yield m.Tmknod(0, ROOT, b"fifo", stat.S_IFIFO | 0o644, 0, 0, 0)
    yield m.Tsymlink(0, ROOT, b"link", b"file", 0)
    yield m.Tlink(0, ROOT, file_fid, b"hard")
    yield m.Trenameat(0, ROOT, b"file", ROOT, b"moved")
    yield m.Tunlinkat(0, ROOT, b"file", 0)
    yield m.Tunlinkat(0, ROOT, b"sub", m.AT_REMOVEDIR)
    yield m.Twrite(0, client.open(b"file"), 0, b"overwritten")


def test_every_change_is_erofs(read_only):
    for message in changes(read_only):
        assert errno_of(read_only.call, message) == errno.EROFS, message


def test_reading_works_as_usual(read_only):
    fid = read_only.open(b"sub", b"inner")
    assert read_only.read(fid, 0, 100) == b"inner file"
    read_only.call(m.Tfsync(0, fid, 0))
    lock = m.Tlock(0, fid, m.LOCK_TYPE_RDLCK, 0, 0, 0, 1, b"guest")
    assert read_only.call(lock).status == m.LOCK_SUCCESS
    names = [name for name, _, _ in read_only.readdir(read_only.open(b"sub"))]
    assert b"inner" in names
    assert read_only.readlink(read_only.walk_new(b"rel_link")) == b"../outside/secret"
    read_only.call(m.Tstatfs(0, ROOT))
    read_only.getattr(ROOT)
    read_only.setattr(ROOT, m.SETATTR_CTIME)  # nothing to change: no error
