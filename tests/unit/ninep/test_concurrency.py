"""Several requests in flight at once, as a virtio worker pool will send them."""

from __future__ import annotations

import os
import threading

from kvmlet.ninep import files
from kvmlet.ninep import messages as m
from tests.helpers.ninep_client import ROOT, NinePClient
from tests.unit.ninep.conftest import open_fds


def test_threads_serving_at_once_keep_every_file_whole(server, tree):
    setup = NinePClient(server).mount()
    errors: list[BaseException] = []

    def worker(index: int) -> None:
        try:
            client = NinePClient(server, setup.msize, first_fid=10_000 * (index + 1))
            name = f"worker-{index}".encode()
            payload = os.urandom(20_000 + index)
            for round_number in range(15):
                fid = client.create(name + b"-%d" % round_number, payload)
                assert client.read(fid, 0, len(payload)) == payload
                reader = client.open(b"sub", b"inner")
                assert client.read(reader, 0, 100) == b"inner file"
                client.clunk(reader)
                client.clunk(fid)
                client.unlink(ROOT, name + b"-%d" % round_number)
        except BaseException as error:  # reported below, on the test's thread
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(index,)) for index in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    assert sorted(os.listdir(tree.share / "sub")) == ["deep_link", "inner"]
    assert len(server.share.table) == 1  # the root


def test_a_clunk_during_a_read_closes_the_descriptor_only_after_it(server, client, monkeypatch):
    """The read keeps using its descriptor; a number closed under it could be reused by
    another open and the read would land in the wrong file."""
    fid = client.open(b"sub", b"inner")
    reading, release = threading.Event(), threading.Event()
    real_read_into = files.read_into

    def slow_read_into(fd, views, offset, length):
        reading.set()
        release.wait(10)
        return real_read_into(fd, views, offset, length)

    monkeypatch.setattr(files, "read_into", slow_read_into)
    reply = bytearray(4096)
    request = m.encode(m.Tread(77, fid, 0, 100))
    thread = threading.Thread(
        target=server.handle, args=([memoryview(request)], [memoryview(reply)])
    )
    thread.start()
    assert reading.wait(10)
    before = open_fds()
    client.clunk(fid)
    assert open_fds() == before  # still in use
    release.set()
    thread.join(10)
    assert m.decode_response(reply) == m.Rread(77, b"inner file")
    assert len(open_fds() - before) == 0 and len(before - open_fds()) >= 1
