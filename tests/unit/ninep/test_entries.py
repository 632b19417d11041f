"""Attributes and directory entries: getattr, setattr, statfs, mkdir, mknod, symlink,
readlink, link, renameat, unlinkat."""

from __future__ import annotations

import errno
import os
import stat

from kvmlet.ninep import host
from kvmlet.ninep import messages as m
from tests.helpers.ninep_client import ROOT, errno_of


def test_getattr_reports_what_stat_says(client, tree):
    status = (tree.share / "sub" / "inner").stat()
    reply = client.getattr(client.walk_new(b"sub", b"inner"))
    assert reply.valid == m.GETATTR_BASIC
    assert (reply.mode, reply.uid, reply.gid, reply.nlink) == (
        status.st_mode,
        status.st_uid,
        status.st_gid,
        status.st_nlink,
    )
    assert (reply.size, reply.blksize, reply.blocks) == (
        status.st_size,
        status.st_blksize,
        status.st_blocks,
    )
    assert reply.mtime_sec * 10**9 + reply.mtime_nsec == status.st_mtime_ns
    assert reply.ctime_sec * 10**9 + reply.ctime_nsec == status.st_ctime_ns
    link = client.getattr(client.walk_new(b"abs_link"))
    assert stat.S_ISLNK(link.mode) and link.qid.type == m.QT_SYMLINK


def test_setattr_mode_owner_size_and_times(client, tree):
    fid = client.walk_new(b"file")
    path = tree.share / "file"
    client.setattr(fid, m.SETATTR_MODE, mode=0o640)
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    client.setattr(fid, m.SETATTR_UID | m.SETATTR_GID, uid=os.getuid(), gid=os.getgid())
    client.setattr(fid, m.SETATTR_SIZE, size=3)
    assert path.read_bytes() == b"ins"
    client.setattr(fid, m.SETATTR_SIZE, size=5)
    assert path.read_bytes() == b"ins\0\0"
    client.setattr(
        fid,
        m.SETATTR_ATIME | m.SETATTR_ATIME_SET | m.SETATTR_MTIME | m.SETATTR_MTIME_SET,
        atime_sec=1_000,
        atime_nsec=1,
        mtime_sec=2_000,
        mtime_nsec=999_999_999,
    )
    status = path.stat()
    assert (status.st_atime_ns, status.st_mtime_ns) == (
        1_000 * 10**9 + 1,
        2_000 * 10**9 + 999_999_999,
    )
    client.setattr(fid, m.SETATTR_MTIME)
    assert path.stat().st_mtime_ns > status.st_mtime_ns
    assert path.stat().st_atime_ns == status.st_atime_ns
    assert errno_of(
        client.setattr, fid, m.SETATTR_MTIME | m.SETATTR_MTIME_SET, mtime_nsec=10**9
    ) == (errno.EINVAL)


def test_setattr_size_of_an_open_fid_uses_it(client, tree):
    fid = client.open(b"file", flags=m.L_WRONLY)
    client.setattr(fid, m.SETATTR_SIZE, size=1)
    assert (tree.share / "file").read_bytes() == b"i"
    assert errno_of(client.setattr, fid, m.SETATTR_SIZE, size=1 << 63) == errno.EINVAL
    assert errno_of(client.setattr, client.walk_new(b"sub"), m.SETATTR_SIZE) == errno.EISDIR


def test_setattr_of_a_symlinks_mode_is_refused_and_ctime_alone_does_nothing(client, tree):
    link = client.walk_new(b"abs_link")
    assert errno_of(client.setattr, link, m.SETATTR_MODE, mode=0o777) == errno.EOPNOTSUPP
    client.setattr(link, m.SETATTR_CTIME)
    client.setattr(link, m.SETATTR_MTIME | m.SETATTR_MTIME_SET, mtime_sec=5)
    assert (tree.share / "abs_link").lstat().st_mtime == 5


def test_statfs_describes_the_host_file_system(client, tree):
    reply = client.call(m.Tstatfs(0, ROOT))
    host = os.statvfs(tree.share)
    assert (reply.bsize, reply.blocks, reply.namelen) == (host.f_bsize, host.f_blocks, 255)
    assert reply.files == host.f_files


def test_mkdir_with_the_exact_mode(client, tree):
    old_umask = os.umask(0o077)
    try:
        qid = client.mkdir(ROOT, b"made", 0o775)
    finally:
        os.umask(old_umask)
    assert qid.type == m.QT_DIR
    assert stat.S_IMODE((tree.share / "made").stat().st_mode) == 0o775
    assert errno_of(client.mkdir, ROOT, b"made") == errno.EEXIST
    assert errno_of(client.mkdir, client.walk_new(b"file"), b"x") == errno.ENOTDIR


def test_mknod_makes_fifos_and_sockets_never_devices(client, tree):
    client.call(m.Tmknod(0, ROOT, b"fifo", stat.S_IFIFO | 0o600, 0, 0, 0))
    assert stat.S_ISFIFO((tree.share / "fifo").stat().st_mode)
    client.call(m.Tmknod(0, ROOT, b"sock", stat.S_IFSOCK | 0o600, 0, 0, 0))
    assert stat.S_ISSOCK((tree.share / "sock").lstat().st_mode)
    client.call(m.Tmknod(0, ROOT, b"plain", 0o600, 0, 0, 0))
    assert stat.S_ISREG((tree.share / "plain").stat().st_mode)
    for kind in (stat.S_IFCHR, stat.S_IFBLK):
        assert errno_of(client.call, m.Tmknod(0, ROOT, b"dev", kind | 0o666, 8, 0, 0)) == (
            errno.EPERM
        )
    assert errno_of(client.call, m.Tmknod(0, ROOT, b"d", stat.S_IFDIR | 0o7, 0, 0, 0)) == (
        errno.EINVAL
    )
    assert not (tree.share / "dev").exists()


def test_symlink_stores_the_target_verbatim_and_readlink_reads_it(client, tree):
    qid = client.symlink(ROOT, b"made_link", b"../../anything/at/all")
    assert qid.type == m.QT_SYMLINK
    assert os.readlink(tree.share / "made_link") == "../../anything/at/all"
    assert client.readlink(client.walk_new(b"made_link")) == b"../../anything/at/all"
    assert errno_of(client.readlink, client.walk_new(b"file")) == errno.EINVAL
    assert errno_of(client.symlink, ROOT, b"empty", b"") == errno.ENOENT
    assert errno_of(client.symlink, ROOT, b"nul", b"a\0b") == errno.EINVAL
    assert errno_of(client.symlink, ROOT, b"long", b"a" * 4096) == errno.ENAMETOOLONG


def test_link_adds_a_name_for_the_fids_file(client, tree):
    client.call(m.Tlink(0, client.walk_new(b"sub"), client.walk_new(b"file"), b"hard"))
    assert (tree.share / "sub" / "hard").stat().st_ino == (tree.share / "file").stat().st_ino
    assert (tree.share / "file").stat().st_nlink == 2
    assert errno_of(client.call, m.Tlink(0, ROOT, client.walk_new(b"sub"), b"x")) == errno.EPERM


def test_renameat_moves_and_fids_follow(client, tree):
    walked = client.walk_new(b"file")
    client.rename(ROOT, b"file", client.walk_new(b"sub"), b"moved")
    assert (tree.share / "sub" / "moved").read_bytes() == b"inside"
    assert not (tree.share / "file").exists()
    client.lopen(walked)
    assert client.read(walked, 0, 100) == b"inside"
    client.call(m.Tlink(0, ROOT, walked, b"again"))
    assert (tree.share / "again").read_bytes() == b"inside"


def test_fids_below_a_renamed_directory_keep_working(client, tree):
    inner = client.walk_new(b"sub", b"inner")
    client.rename(ROOT, b"sub", ROOT, b"renamed")
    client.lopen(inner)
    assert client.read(inner, 0, 100) == b"inner file"


def test_a_replaced_file_is_stale_for_its_old_fids(client, tree):
    walked = client.walk_new(b"file")
    (tree.share / "other").write_bytes(b"other")
    client.rename(ROOT, b"other", ROOT, b"file")
    assert errno_of(client.lopen, walked) == errno.ESTALE
    assert client.read(client.open(b"file"), 0, 10) == b"other"


def test_unlinkat_files_and_directories(client, tree):
    client.unlink(ROOT, b"file")
    assert not (tree.share / "file").exists()
    assert errno_of(client.unlink, ROOT, b"sub", m.AT_REMOVEDIR) == errno.ENOTEMPTY
    sub = client.walk_new(b"sub")
    client.unlink(sub, b"inner")
    client.unlink(sub, b"deep_link")
    client.unlink(ROOT, b"sub", m.AT_REMOVEDIR)
    assert not (tree.share / "sub").exists()
    assert errno_of(client.unlink, ROOT, b"abs_link", 0x100) == errno.EINVAL
    assert errno_of(client.unlink, ROOT, b"missing") == errno.ENOENT


def test_an_open_file_outlives_its_name(client, tree):
    fid = client.open(b"file", flags=m.L_RDWR)
    client.unlink(ROOT, b"file")
    client.write(fid, 0, b"still")
    assert client.read(fid, 0, 100) == b"stille"
    assert client.getattr(fid).nlink == 0


def test_set_id_bits_are_dropped_when_the_monitor_is_root(server, client, tree):
    server.share.strip_set_id = True  # as when kvmlet runs as root
    client.lcreate(client.walk_new(), b"suid", m.L_RDWR, 0o4755)
    assert stat.S_IMODE((tree.share / "suid").stat().st_mode) == 0o755
    client.setattr(client.walk_new(b"file"), m.SETATTR_MODE, mode=0o6750)
    assert stat.S_IMODE((tree.share / "file").stat().st_mode) == 0o750
    client.mkdir(ROOT, b"shared", 0o2775)  # a directory's set-group-ID only passes its group on
    assert stat.S_IMODE((tree.share / "shared").stat().st_mode) == 0o2775
    server.share.strip_set_id = False  # an ordinary user's own set-ID files are theirs to make
    client.setattr(client.walk_new(b"file"), m.SETATTR_MODE, mode=0o4750)
    assert stat.S_IMODE((tree.share / "file").stat().st_mode) == 0o4750


def test_chmod_without_fchmodat2_still_changes_the_walked_file(client, tree, monkeypatch):
    """Before Linux 6.6 (no fchmodat2) the mode changes through the server's own descriptor."""
    monkeypatch.setattr(host, "SYS_FCHMODAT2", 0x7FFF)  # no such call: ENOSYS
    walked = client.walk_new(b"file")
    os.rename(tree.share / "file", tree.share / "renamed_on_the_host")
    client.setattr(walked, m.SETATTR_MODE, mode=0o604)
    assert stat.S_IMODE((tree.share / "renamed_on_the_host").stat().st_mode) == 0o604
