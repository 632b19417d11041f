"""The session: version, attach, walk, clunk, flush, limits, and what is not spoken."""

from __future__ import annotations

import errno
import os
import struct
import threading
import time

import pytest

from kvmlet.errors import KvmletError
from kvmlet.ninep import Server
from kvmlet.ninep import messages as m
from kvmlet.ninep import server as server_module
from tests.helpers.ninep_client import ROOT, NinePClient, errno_of

# Version ---------------------------------------------------------------------------------


def test_msize_is_the_smaller_of_the_clients_and_the_servers(tree):
    server = Server(str(tree.share), max_msize=64 << 10)
    try:
        client = NinePClient(server)
        reply = client.version(8192)
        assert (reply.msize, reply.version) == (8192, b"9P2000.L")
        assert client.version(1 << 30).msize == 64 << 10
        assert server.msize == 64 << 10
    finally:
        server.close()


def test_only_9p2000_l_is_spoken(server):
    client = NinePClient(server)
    assert client.version(version=b"9P2000.u").version == b"unknown"
    assert client.version(version=b"9P2000").version == b"unknown"
    assert client.version(version=b"9P2000.L.ext").version == b"9P2000.L"
    assert errno_of(client.version, 512) == errno.EINVAL


def test_nothing_but_tversion_before_a_session(server):
    client = NinePClient(server)
    assert errno_of(client.attach) == errno.EPROTO
    assert errno_of(client.call, m.Twrite(0, 0, 0, b"x")) == errno.EPROTO
    client.version()
    client.attach()


def test_a_new_version_starts_a_new_session(client):
    fid = client.walk_new(b"file")
    client.version()
    assert errno_of(client.getattr, fid) == errno.EBADF
    assert errno_of(client.getattr, ROOT) == errno.EBADF


def test_a_reset_forgets_the_session(server, client):
    server.reset()
    assert server.msize == 0
    assert errno_of(client.getattr, ROOT) == errno.EPROTO


# Attach ----------------------------------------------------------------------------------


def test_a_header_split_across_buffers_is_read_whole(client):
    """A message header cut anywhere (the server reads it from the first buffer when it can)
    is read across the buffers: the request is served, with its own tag in the reply."""
    request = m.encode(m.Tgetattr(77, ROOT, m.GETATTR_BASIC))
    for first in range(1, m.HEADER_SIZE + 1):
        room = bytearray(4096)
        parts = [memoryview(request)[:first], memoryview(request)[first:]]
        length = client.server.handle(parts, [memoryview(room)])
        reply = m.decode_response(bytes(room[:length]))
        assert (type(reply), reply.tag) == (m.Rgetattr, 77), first
    assert client.server.handle([memoryview(request)[:3]], [memoryview(bytearray(64))]) == 11


def test_attach_gives_the_root(client, tree):
    qid = client.getattr(ROOT).qid
    assert qid.type == m.QT_DIR
    assert client.getattr(ROOT).mode == tree.share.stat().st_mode
    assert errno_of(client.attach, ROOT) == errno.EINVAL  # fid in use
    assert errno_of(client.call, m.Tattach(0, 5, 3, b"", b"", 0)) == errno.EINVAL
    assert errno_of(client.call, m.Tattach(0, 5, m.NOFID, b"", b"/etc", 0)) == errno.ENOENT
    assert client.call(m.Tattach(0, 5, m.NOFID, b"", b"/", 0)).qid == qid


# Walk ------------------------------------------------------------------------------------


def test_walk_clones_descends_and_reports_each_step(client):
    assert client.walk(ROOT, 1) == ()
    assert client.getattr(1).qid == client.getattr(ROOT).qid
    qids = client.walk(ROOT, 2, b"sub", b"inner")
    assert [qid.type for qid in qids] == [m.QT_DIR, m.QT_FILE]
    assert client.getattr(2).size == len(b"inner file")
    assert client.walk(2, 3) == ()  # a file fid clones too
    assert errno_of(client.walk, 2, 4, b"x") == errno.ENOTDIR


def test_a_walk_that_fails_after_the_first_name_answers_the_prefix(client):
    qids = client.walk(ROOT, 7, b"sub", b"missing", b"more")
    assert len(qids) == 1
    assert errno_of(client.getattr, 7) == errno.EBADF  # newfid not made
    assert errno_of(client.walk, ROOT, 7, b"missing") == errno.ENOENT


def test_walk_reuses_its_own_fid_and_refuses_a_taken_newfid(client):
    client.walk(ROOT, 1, b"sub")
    client.walk(1, 1, b"inner")
    assert client.getattr(1).size == len(b"inner file")
    client.walk(ROOT, 2)
    assert errno_of(client.walk, ROOT, 2, b"sub") == errno.EINVAL
    assert errno_of(client.walk, ROOT, 3, *[b"sub"] * 17) == errno.EINVAL


def test_dot_dot_goes_up_and_stops_at_the_root(client):
    root = client.getattr(ROOT).qid
    assert client.walk(ROOT, 1, b"..")[-1] == root
    assert client.walk(ROOT, 2, b"sub", b"..")[-1] == root
    assert client.walk(ROOT, 3, b"sub", b"..", b"..", b"..", b"sub")[-1].type == m.QT_DIR
    assert errno_of(client.walk, ROOT, 4, b".") == errno.EINVAL


def test_qids_tell_files_apart(client):
    one, two = client.walk(ROOT, 1, b"file")[0], client.walk(ROOT, 2, b"sub", b"inner")[-1]
    assert one.path != two.path
    assert client.walk(ROOT, 3, b"file")[0] == one


# Clunk, remove, limits ------------------------------------------------------------------


def test_clunk_forgets_a_fid(client):
    client.walk(ROOT, 1, b"file")
    client.clunk(1)
    assert errno_of(client.getattr, 1) == errno.EBADF
    assert errno_of(client.clunk, 1) == errno.EBADF


def test_tremove_is_not_spoken_but_clunks_as_9p_says(client, tree):
    client.walk(ROOT, 1, b"file")
    assert errno_of(client.call, m.Tremove(0, 1)) == errno.EOPNOTSUPP
    assert errno_of(client.getattr, 1) == errno.EBADF
    assert (tree.share / "file").exists()


def test_the_fid_count_is_bounded(tree):
    server = Server(str(tree.share), max_fids=4)
    try:
        client = NinePClient(server).mount()
        for fid in (1, 2, 3):
            client.walk(ROOT, fid)
        assert errno_of(client.walk, ROOT, 4, b"file") == errno.EMFILE
        assert errno_of(client.attach, 9) == errno.EMFILE
        client.walk(ROOT, ROOT, b"sub")  # reusing a fid is no new one
        client.clunk(1)
        client.walk(ROOT, 4, b"inner")
    finally:
        server.close()


def test_open_descriptors_are_released_by_clunks(server, client):
    before = set(os.listdir("/proc/self/fd"))
    for fid in range(1, 40):
        client.walk(ROOT, fid, b"sub", b"inner")
        client.lopen(fid)
    client.lcreate(client.walk_new(), b"new")
    assert len(set(os.listdir("/proc/self/fd")) - before) >= 39
    client.version()  # a new session clunks everything
    assert set(os.listdir("/proc/self/fd")) <= before


# What is not spoken -------------------------------------------------------------------


@pytest.mark.parametrize(
    "message",
    [
        m.Txattrwalk(0, ROOT, 5, b"user.x"),
        m.Txattrcreate(0, ROOT, b"user.x", 3, 0),
        m.Tauth(0, 5, b"u", b"", 0),
        m.Trename(0, ROOT, ROOT, b"x"),
    ],
)
def test_unsupported_operations_answer_eopnotsupp(client, message):
    assert errno_of(client.call, message) == errno.EOPNOTSUPP


def test_unknown_and_reply_types_answer_eopnotsupp(client):
    for type_number in (0, 6, 113, 124, 126, 200, m.Rread.TYPE):
        reply = m.decode_response(client.raw(struct.pack("<IBHI", 11, type_number, 77, 0)))
        assert reply == m.Rlerror(77, errno.EOPNOTSUPP)


def test_a_request_larger_than_msize_is_refused(client):
    reply = m.decode_response(client.raw(m.encode(m.Twrite(3, 0, 0, bytes(client.msize)))))
    assert reply == m.Rlerror(3, errno.EMSGSIZE)


def test_a_reply_that_does_not_fit_is_an_error_and_no_room_is_no_reply(client):
    target = b"t" * 200
    client.symlink(ROOT, b"long", target)
    fid = client.walk_new(b"long")
    assert errno_of(client.call, m.Treadlink(0, fid), capacity=100) == errno.EMSGSIZE
    assert client.raw(m.encode(m.Tclunk(1, fid)), capacity=10) == b""
    client.getattr(fid)  # the clunk was not executed


# Flush -----------------------------------------------------------------------------------


def test_flush_answers_after_the_request_it_names(server, client, monkeypatch):
    started, release = threading.Event(), threading.Event()
    real_statfs = server_module._OPERATIONS[m.Tstatfs.TYPE]

    def slow_statfs(share, message):
        started.set()
        release.wait(10)
        return real_statfs(share, message)

    monkeypatch.setitem(server_module._OPERATIONS, m.Tstatfs.TYPE, slow_statfs)
    order = []

    def run(message, name):
        reply = bytearray(256)
        server.handle([memoryview(m.encode(message))], [memoryview(reply)])
        order.append((name, m.decode_response(reply)))

    slow = threading.Thread(target=run, args=(m.Tstatfs(40, ROOT), "statfs"))
    slow.start()
    assert started.wait(10)
    flush = threading.Thread(target=run, args=(m.Tflush(41, 40), "flush"))
    flush.start()
    time.sleep(0.2)
    assert order == []  # the flush waits
    release.set()
    slow.join(10)
    flush.join(10)
    assert [name for name, _ in order] == ["statfs", "flush"]
    assert order[1][1] == m.Rflush(41)


def test_flush_of_nothing_in_flight_answers_at_once(client):
    assert isinstance(client.call(m.Tflush(0, 1234)), m.Rflush)


# The share itself --------------------------------------------------------------------


def test_unshareable_directories_are_one_clear_error(tmp_path):
    with pytest.raises(KvmletError, match="No such file"):
        Server(str(tmp_path / "missing"))
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(KvmletError, match="Not a directory"):
        Server(str(tmp_path / "file"))
    with pytest.raises(KvmletError, match="proc"):
        Server("/proc")
    with pytest.raises(KvmletError, match="sysfs"):
        Server("/sys")


def test_every_reply_is_smaller_than_msize_as_linux_requires(server, tree):
    client = NinePClient(server, msize=4096).mount()
    header = m.HEADER_SIZE + 2  # Rreadlink: the message header and the string's length
    os.symlink("t" * (4096 - header - 1), tree.share / "fits")
    os.symlink("t" * (4096 - header), tree.share / "exactly")
    assert len(client.readlink(client.walk_new(b"fits"))) == 4096 - header - 1
    assert errno_of(client.readlink, client.walk_new(b"exactly")) == errno.EMSGSIZE
