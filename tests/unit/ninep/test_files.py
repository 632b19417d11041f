"""Open files: lopen, lcreate, read, write, readdir, fsync, lock and getlock."""

from __future__ import annotations

import errno
import fcntl
import os
import stat

import pytest

from kvmlet.ninep import messages as m
from tests.helpers.ninep_client import ROOT, NinePClient, errno_of


def test_lopen_opens_for_reading_and_writing(client, tree):
    reader = client.open(b"file")
    assert client.read(reader, 0, 100) == b"inside"
    assert client.read(reader, 2, 3) == b"sid"
    assert client.read(reader, 6, 100) == b""
    assert errno_of(client.write, reader, 0, b"x") == errno.EBADF
    writer = client.open(b"file", flags=m.L_WRONLY)
    assert client.write(writer, 6, b" out") == 4
    assert errno_of(client.read, writer, 0, 10) == errno.EBADF
    assert (tree.share / "file").read_bytes() == b"inside out"


def test_lopen_flags(client, tree):
    truncating = client.open(b"file", flags=m.L_RDWR | m.L_TRUNC)
    assert (tree.share / "file").read_bytes() == b""
    client.write(truncating, 0, b"abc")
    appending = client.open(b"file", flags=m.L_WRONLY | m.L_APPEND)
    client.write(appending, 0, b"def")
    assert (tree.share / "file").read_bytes() == b"abcdef"
    fid = client.walk_new(b"file")
    assert errno_of(client.lopen, fid, 3) == errno.EINVAL
    assert errno_of(client.lopen, fid, m.L_DIRECTORY) == errno.ENOTDIR
    client.lopen(fid)
    assert errno_of(client.lopen, fid) == errno.EBADF


def test_directories_open_read_only(client):
    fid = client.walk_new(b"sub")
    assert errno_of(client.lopen, fid, m.L_WRONLY) == errno.EISDIR
    assert errno_of(client.lopen, fid, m.L_RDONLY | m.L_TRUNC) == errno.EISDIR
    qid = client.lopen(fid, m.L_RDONLY | m.L_DIRECTORY).qid
    assert qid.type == m.QT_DIR
    assert errno_of(client.read, fid, 0, 10) == errno.EISDIR


def test_only_regular_files_and_directories_open(client, tree):
    os.mkfifo(tree.share / "fifo")
    assert errno_of(client.lopen, client.walk_new(b"fifo")) == errno.ENXIO
    assert errno_of(client.lopen, client.walk_new(b"rel_link")) == errno.ELOOP


def test_lcreate_makes_the_fid_the_new_file_with_the_exact_mode(client, tree):
    old_umask = os.umask(0o077)
    try:
        fid = client.walk_new()
        reply = client.lcreate(fid, b"new", m.L_RDWR, 0o664)
    finally:
        os.umask(old_umask)
    assert reply.qid.type == m.QT_FILE
    assert stat.S_IMODE((tree.share / "new").stat().st_mode) == 0o664
    assert client.write(fid, 0, b"created") == 7
    assert client.read(fid, 0, 100) == b"created"
    assert client.getattr(fid).qid == reply.qid
    assert errno_of(client.lcreate, fid, b"again") == errno.EBADF  # no longer a directory


def test_lcreate_of_an_existing_name(client, tree):
    assert errno_of(client.lcreate, client.walk_new(), b"file", m.L_RDWR | m.L_EXCL) == errno.EEXIST
    fid = client.walk_new()
    client.lcreate(fid, b"file", m.L_RDWR | m.L_TRUNC, 0o600)
    assert (tree.share / "file").read_bytes() == b""
    assert stat.S_IMODE((tree.share / "file").stat().st_mode) != 0o600  # existing: mode kept
    assert errno_of(client.lcreate, client.walk_new(), b"sub") == errno.EISDIR
    os.mkfifo(tree.share / "fifo")
    assert errno_of(client.lcreate, client.walk_new(), b"fifo", m.L_RDONLY) == errno.ENXIO


def test_lcreate_needs_a_directory_fid(client):
    assert errno_of(client.lcreate, client.walk_new(b"file"), b"x") == errno.ENOTDIR


def test_large_transfers_go_through_many_buffers(server, tree):
    client = NinePClient(server, msize=512 << 10, pieces=37).mount()
    data = os.urandom(300_000)
    fid = client.create(b"big", data)
    assert (tree.share / "big").read_bytes() == data
    assert client.read(fid, 0, len(data)) == data
    assert client.read(fid, 1000, 5000) == data[1000:6000]


def test_reads_are_clamped_to_msize_and_to_the_reply_buffer(client, tree):
    data = os.urandom(client.msize * 2)
    (tree.share / "big").write_bytes(data)
    fid = client.open(b"big")
    whole = client.read(fid, 0, 0xFFFF_FFFF)
    assert whole == data[: client.msize - m.IO_HEADER_SIZE]
    small = client.call(m.Tread(0, fid, 10, 1000), capacity=111).data
    assert small == data[10:110]


def test_offsets_beyond_the_file_range_are_einval(client):
    fid = client.open(b"file", flags=m.L_RDWR)
    assert errno_of(client.read, fid, 1 << 63, 10) == errno.EINVAL
    assert errno_of(client.write, fid, (1 << 63) - 2, b"abc") == errno.EINVAL
    assert client.read(fid, (1 << 63) - 1, 10) == b""


def test_readdir_lists_everything_once_across_pages(client, tree):
    for index in range(150):
        (tree.share / "sub" / f"entry-{index:03}-{'x' * (index % 40)}").write_bytes(b"")
    fid = client.open(b"sub")
    for count in (100, 300, 8192):
        entries = client.readdir(fid, count)
        names = [name for name, _, _ in entries]
        assert len(names) == len(set(names))
        assert set(names) == {os.fsencode(name) for name in os.listdir(tree.share / "sub")} | {
            b".",
            b"..",
        }


def test_readdir_with_no_room_for_an_entry_is_einval_not_the_end(client, tree):
    (tree.share / "sub" / ("long" * 20)).write_bytes(b"")
    fid = client.open(b"sub")
    assert errno_of(client.readdir, fid, 24 + 20) == errno.EINVAL


def test_readdir_reports_types(client):
    fid = client.open()
    types = {name: (d_type, qid_type) for name, d_type, qid_type in client.readdir(fid)}
    assert types[b"sub"] == (4, m.QT_DIR)
    assert types[b"file"] == (8, m.QT_FILE)
    assert types[b"abs_link"] == (10, m.QT_SYMLINK)


def test_readdir_needs_an_open_directory(client):
    assert errno_of(client.readdir, client.walk_new(b"sub")) == errno.EBADF
    assert errno_of(client.readdir, client.open(b"file")) == errno.ENOTDIR


def test_fsync(client):
    fid = client.open(b"file", flags=m.L_RDWR)
    client.call(m.Tfsync(0, fid, 0))
    client.call(m.Tfsync(0, fid, 1))
    assert errno_of(client.call, m.Tfsync(0, client.walk_new(b"file"), 0)) == errno.EBADF


def _lock(client, fid, kind, start=0, length=0):
    return client.call(m.Tlock(0, fid, kind, 0, start, length, 42, b"guest")).status


def _getlock(client, fid, kind, start=0, length=0):
    return client.call(m.Tgetlock(0, fid, kind, start, length, 42, b"guest"))


def test_locks_of_different_fids_conflict_and_never_block(client):
    first = client.open(b"file", flags=m.L_RDWR)
    second = client.open(b"file", flags=m.L_RDWR)
    assert _getlock(client, second, m.LOCK_TYPE_WRLCK).type == m.LOCK_TYPE_UNLCK
    assert _lock(client, first, m.LOCK_TYPE_WRLCK, 0, 10) == m.LOCK_SUCCESS
    conflict = _getlock(client, second, m.LOCK_TYPE_RDLCK)
    assert (conflict.type, conflict.start, conflict.length) == (m.LOCK_TYPE_WRLCK, 0, 10)
    assert _lock(client, second, m.LOCK_TYPE_RDLCK, 5, 1) == m.LOCK_BLOCKED
    assert _lock(client, second, m.LOCK_TYPE_WRLCK, 10, 5) == m.LOCK_SUCCESS
    assert _lock(client, first, m.LOCK_TYPE_UNLCK, 0, 10) == m.LOCK_SUCCESS
    assert _lock(client, second, m.LOCK_TYPE_RDLCK, 5, 1) == m.LOCK_SUCCESS


def test_lock_arguments_are_checked(client):
    fid = client.open(b"file", flags=m.L_RDWR)
    assert errno_of(_lock, client, fid, 7) == errno.EINVAL
    assert errno_of(_lock, client, fid, m.LOCK_TYPE_WRLCK, 1 << 63) == errno.EINVAL
    assert errno_of(_lock, client, client.walk_new(b"file"), m.LOCK_TYPE_WRLCK) == errno.EBADF
    reader = client.open(b"file")
    assert errno_of(_lock, client, reader, m.LOCK_TYPE_WRLCK) == errno.EBADF


@pytest.mark.parametrize("flags", [m.L_RDONLY, m.L_WRONLY, m.L_RDWR])
def test_open_fids_follow_their_access_mode(client, flags):
    fid = client.open(b"file", flags=flags)
    readable = flags != m.L_WRONLY
    writable = flags != m.L_RDONLY
    assert (client.rpc(m.Tread(0, fid, 0, 1)).TYPE == m.Rread.TYPE) == readable
    assert (client.rpc(m.Twrite(0, fid, 0, b"i")).TYPE == m.Rwrite.TYPE) == writable


def test_an_unopened_fid_reads_and_writes_nothing(client):
    fid = client.walk_new(b"file")
    assert errno_of(client.read, fid, 0, 1) == errno.EBADF
    assert errno_of(client.write, fid, 0, b"x") == errno.EBADF
    assert client.getattr(ROOT).qid.type == m.QT_DIR


def test_opened_descriptors_are_blocking_again(server, client, tree):
    """Opens that might meet a FIFO use O_NONBLOCK; what the fid keeps must not."""
    opened = [client.open(b"file"), client.walk_new()]
    client.lcreate(opened[1], b"file", m.L_RDWR)
    for number in opened:
        fid = server.share.table.use(number)
        try:
            assert not fcntl.fcntl(fid.opened, fcntl.F_GETFL) & os.O_NONBLOCK
        finally:
            server.share.table.done(fid)
