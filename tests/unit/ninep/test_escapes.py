"""Every way out of the share a guest could try, refused.

The `tree` fixture checks after each test that nothing outside the share was created, changed
or removed, and the `client` fixture that no reply carried the secret file's contents.
"""

from __future__ import annotations

import errno
import os
import stat
import threading

import pytest

from kvmlet.ninep import Server, host
from kvmlet.ninep import messages as m
from tests.helpers.ninep_client import ROOT, NinePClient, errno_of
from tests.unit.ninep.conftest import SECRET, assert_no_secret

BAD_NAMES = [b"", b".", b"..", b"a/b", b"../outside", b"/etc/passwd", b"a\0b", b"x" * 256]


def test_dot_dot_at_the_root_stays_at_the_root(client):
    root = client.getattr(ROOT).qid
    assert client.walk(ROOT, 1, b"..", b"..", b"..") == (root, root, root)
    assert client.getattr(1).qid == root


def test_dot_dot_never_reaches_the_outside(client):
    root = client.getattr(ROOT).qid
    sub = client.walk(ROOT, 1, b"sub")[0]
    assert client.walk(ROOT, 2, b"sub", b"..", b"..", b"sub") == (sub, root, root, sub)
    for names in ([b"..", b"outside"], [b"sub", b"..", b"..", b"..", b"outside", b"secret"]):
        qids = client.walk(ROOT, 3, *names)
        assert qids[-1] == root
        assert len(qids) == names.index(b"outside")
    assert errno_of(client.getattr, 3) == errno.EBADF


@pytest.mark.parametrize("name", [name for name in BAD_NAMES if name != b".."])
def test_a_walk_name_must_be_one_entry(client, name):
    expected = errno.ENAMETOOLONG if len(name) > 255 else errno.EINVAL
    assert errno_of(client.walk, ROOT, 9, name) == expected
    assert len(client.walk(ROOT, 9, b"sub", name)) == 1  # stops there
    assert errno_of(client.getattr, 9) == errno.EBADF


@pytest.mark.parametrize("name", BAD_NAMES)
def test_names_that_are_not_one_entry_are_refused_by_every_operation(client, name, tree):
    file_fid = client.walk_new(b"file")
    calls = [
        m.Tlcreate(0, client.walk_new(), name, m.L_RDWR, 0o644, 0),
        m.Tmkdir(0, ROOT, name, 0o755, 0),
        m.Tmknod(0, ROOT, name, stat.S_IFIFO | 0o644, 0, 0, 0),
        m.Tsymlink(0, ROOT, name, b"target", 0),
        m.Tlink(0, ROOT, file_fid, name),
        m.Trenameat(0, ROOT, b"file", ROOT, name),
        m.Trenameat(0, ROOT, name, ROOT, b"renamed"),
        m.Tunlinkat(0, ROOT, name, 0),
        m.Tunlinkat(0, ROOT, name, m.AT_REMOVEDIR),
    ]
    for message in calls:
        assert errno_of(client.call, message) in (errno.EINVAL, errno.ENAMETOOLONG), message
    assert sorted(os.listdir(tree.share)) == sorted(
        ["file", "sub", "abs_link", "rel_link", "dir_link", "dangling", "proc_link"]
    )


@pytest.mark.parametrize("link", [b"abs_link", b"rel_link", b"proc_link"])
def test_symlinks_pointing_out_are_read_never_followed(client, link, tree):
    qid = client.walk(ROOT, 1, link)[0]
    assert qid.type == m.QT_SYMLINK
    assert errno_of(client.lopen, 1) == errno.ELOOP
    assert errno_of(client.lopen, 1, m.L_RDWR | m.L_TRUNC) == errno.ELOOP
    assert client.readlink(1) == os.fsencode(os.readlink(tree.share / os.fsdecode(link)))
    assert client.getattr(1).size == len(client.readlink(1))  # the link's, not its target's
    assert errno_of(client.setattr, 1, m.SETATTR_SIZE, size=0) == errno.ELOOP
    assert errno_of(client.setattr, 1, m.SETATTR_MODE, mode=0o777) == errno.EOPNOTSUPP


@pytest.mark.parametrize(
    "names", [(b"dir_link", b"secret"), (b"sub", b"deep_link", b"secret2"), (b"proc_link", b"etc")]
)
def test_symlinks_to_directories_outside_are_not_traversed(client, names):
    qids = client.walk(ROOT, 1, *names)
    assert len(qids) < len(names)
    assert qids[-1].type == m.QT_SYMLINK
    assert errno_of(client.getattr, 1) == errno.EBADF
    for operation in (
        m.Tlcreate(0, client.walk_new(*names[:-1]), b"x", m.L_RDWR, 0o644, 0),
        m.Tmkdir(0, client.walk_new(*names[:-1]), b"x", 0o755, 0),
        m.Tunlinkat(0, client.walk_new(*names[:-1]), names[-1], 0),
    ):
        assert errno_of(client.call, operation) == errno.ENOTDIR


def test_creating_through_a_dangling_symlink_creates_nothing_outside(client, tree):
    assert errno_of(client.lcreate, client.walk_new(), b"dangling", m.L_RDWR) == errno.ELOOP
    flags = m.L_RDWR | m.L_EXCL
    assert errno_of(client.lcreate, client.walk_new(), b"dangling", flags) == errno.EEXIST
    assert errno_of(client.mkdir, ROOT, b"dangling") == errno.EEXIST
    assert errno_of(client.symlink, ROOT, b"dangling", b"x") == errno.EEXIST
    assert not (tree.outside / "created_by_guest").exists()


def test_names_of_symlinks_act_on_the_links(client, tree):
    client.rename(ROOT, b"abs_link", ROOT, b"renamed_link")
    client.unlink(ROOT, b"rel_link")
    client.call(m.Tlink(0, ROOT, client.walk_new(b"renamed_link"), b"hard_link"))
    assert os.readlink(tree.share / "hard_link") == str(tree.outside / "secret")
    assert not (tree.share / "rel_link").exists()
    assert (tree.outside / "secret").read_bytes() == SECRET


def test_a_symlink_swapped_in_between_walk_and_open_is_not_followed(client, tree):
    victim = tree.share / "victim"
    victim.write_bytes(b"victim")
    fid = client.walk_new(b"victim")
    truncating = client.walk_new(b"victim")
    renamed = client.walk_new(b"victim")
    os.unlink(victim)
    os.symlink(tree.outside / "secret", victim)
    assert errno_of(client.lopen, fid) == errno.ELOOP
    assert errno_of(client.lopen, truncating, m.L_RDWR | m.L_TRUNC) == errno.ELOOP
    assert errno_of(client.setattr, renamed, m.SETATTR_SIZE, size=0) == errno.ELOOP
    assert errno_of(client.call, m.Tlink(0, ROOT, renamed, b"hard")) == errno.ESTALE
    client.setattr(renamed, m.SETATTR_MODE, mode=0o600)  # the walked (now unlinked) file's
    assert (tree.outside / "secret").read_bytes() == SECRET


def test_a_directory_swapped_for_a_symlink_keeps_its_fids_inside(client, tree):
    walked = client.walk_new(b"sub")
    os.rename(tree.share / "sub", tree.share / "sub_moved")
    os.symlink(tree.outside / "dir", tree.share / "sub")
    assert errno_of(client.walk, walked, 1, b"secret2") == errno.ENOENT
    assert client.walk(walked, 2, b"inner")[0].type == m.QT_FILE
    client.lcreate(walked, b"made", m.L_RDWR)
    assert (tree.share / "sub_moved" / "made").exists()


def test_a_file_swapped_for_another_is_stale_not_opened(client, tree):
    fid = client.walk_new(b"file")
    os.rename(tree.share / "sub" / "inner", tree.share / "file")
    assert errno_of(client.lopen, fid) == errno.ESTALE


def test_a_fifo_swapped_in_does_not_block_the_server(client, tree):
    fid = client.walk_new(b"file")
    os.unlink(tree.share / "file")
    os.mkfifo(tree.share / "file")
    results = []
    attempts = [
        lambda: errno_of(client.lopen, fid),
        lambda: errno_of(client.lcreate, client.walk_new(), b"file", m.L_RDONLY),
    ]
    thread = threading.Thread(target=lambda: results.extend(a() for a in attempts), daemon=True)
    thread.start()
    thread.join(5)
    if thread.is_alive():  # release the open blocked on the FIFO before failing
        os.close(os.open(tree.share / "file", os.O_WRONLY | os.O_NONBLOCK))
        thread.join(5)
        pytest.fail("opening a FIFO blocked the server")
    assert results == [errno.ESTALE, errno.ENXIO]


def test_the_host_root_shared_read_only_seals_proc_and_sys():
    server = Server("/", read_only=True)
    try:
        client = NinePClient(server).mount()
        for mount_point in (b"proc", b"sys"):
            qid = client.walk(ROOT, 1, mount_point)[0]  # a guest can mount its own there
            assert qid.type == m.QT_DIR
            assert client.getattr(1).qid == qid
            assert errno_of(client.lopen, 1) == errno.EACCES
            assert errno_of(client.walk, 1, 2, b"self") == errno.EACCES
            assert client.walk(ROOT, 2, mount_point, b"self", b"mem") == (qid,)
            client.clunk(1)
        assert len(client.walk(ROOT, 3, b"etc", b"hostname")) == 2
        assert_no_secret(client)
    finally:
        server.close()


def test_openat2_refuses_magic_links_and_following_symlinks(tmp_path):
    """The host layer on its own, from a directory holding /proc's magic links."""
    directory = os.open("/proc/self/fd", os.O_PATH | os.O_DIRECTORY)
    try:
        for flags in (os.O_RDONLY, os.O_WRONLY):
            with pytest.raises(OSError) as caught:
                host.open_beneath(directory, b"0", flags)
            assert caught.value.errno == errno.ELOOP
        with pytest.raises(OSError) as caught:
            host.openat2(directory, b"0/..", os.O_PATH, resolve=host.BENEATH)
        assert caught.value.errno in (errno.ELOOP, errno.EXDEV)
    finally:
        os.close(directory)
    share = os.open(tmp_path, os.O_PATH | os.O_DIRECTORY)
    try:
        for path in (b"../x", b"/etc/passwd"):
            with pytest.raises(OSError) as caught:
                host.openat2(share, path, os.O_PATH)
            assert caught.value.errno == errno.EXDEV
    finally:
        os.close(share)
