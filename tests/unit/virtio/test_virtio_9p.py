"""virtio-9p through the mock driver: the mount tag, and 9P requests in the buffer layouts
Linux's trans_virtio posts (one buffer each way; zero-copy reads and writes with the data in
page-sized buffers of their own, in an indirect table)."""

from __future__ import annotations

import errno
import os
import threading
import time

import pytest

from kvmlet.errors import KvmletError
from kvmlet.ninep import Server
from kvmlet.ninep import messages as m
from kvmlet.virtio.device import InterruptKind
from kvmlet.virtio.p9 import QUEUE_SIZE, VIRTIO_9P_MOUNT_TAG, Virtio9p, check_tag
from kvmlet.virtio.worker import QueueWorker, doorbell
from tests.helpers.virtio_driver import MockDriver

PAGE = 4096
MSIZE = 256 << 10
REPLY_ROOM = 8192


@pytest.fixture
def share(tmp_path):
    directory = tmp_path / "share"
    directory.mkdir()
    (directory / "hello").write_bytes(b"hello from the host")
    return directory


@pytest.fixture
def device(memory, share):
    device = Virtio9p(memory, "hostshare", Server(str(share)))
    yield device
    device.close()


@pytest.fixture
def driver(device, memory):
    driver = MockDriver(device, memory, 0x1000, 3 << 20)
    driver.initialize()
    return driver


def post(driver, out: list[bytes], in_sizes: list[int], indirect: bool = False):
    head, addresses = driver.post_data(0, out, in_sizes, indirect)
    return head, list(zip(addresses, in_sizes, strict=True))


def replies(driver, posted) -> list[bytes]:
    """Kick, then each posted request's reply bytes (checked against its used length)."""
    driver.kick(0)
    completions = {c.head: c.length for c in driver.collect(0)}
    result = []
    for head, buffers in posted:
        data = b"".join(driver.memory.read(address, size) for address, size in buffers)
        result.append(data[: completions[head]])
    return result


def rpc(driver, message, in_sizes=(REPLY_ROOM,)):
    (reply,) = replies(driver, [post(driver, [m.encode(message)], list(in_sizes))])
    return m.decode_response(reply)


def mount(driver):
    assert rpc(driver, m.Tversion(0xFFFF, MSIZE, b"9P2000.L")).msize == MSIZE
    assert rpc(driver, m.Tattach(1, 0, m.NOFID, b"", b"", 0)).qid.type == m.QT_DIR


def test_the_device_offers_its_mount_tag(device):
    assert device.device_id == 9
    assert device.device_features & 1 << VIRTIO_9P_MOUNT_TAG
    assert device.queue_max_size(0) == QUEUE_SIZE
    assert device.read_config(0, 2) == len("hostshare")
    tag = bytes(device.read_config(2 + index, 1) for index in range(len("hostshare")))
    assert tag == b"hostshare"


@pytest.mark.parametrize("tag", ["", "a" * 256, "with,comma", "nul\0"])
def test_tags_a_guest_could_not_mount_by_are_refused(tag):
    with pytest.raises(KvmletError):
        check_tag(tag)
    assert check_tag("a" * 255) == b"a" * 255


def test_requests_are_served_and_interrupt(driver):
    mount(driver)
    qids = rpc(driver, m.Twalk(2, 0, 1, (b"hello",))).qids
    assert len(qids) == 1
    assert rpc(driver, m.Tlopen(3, 1, m.L_RDONLY)).qid == qids[0]
    assert rpc(driver, m.Tread(4, 1, 0, 100)) == m.Rread(4, b"hello from the host")
    assert (InterruptKind.QUEUE, 0) in driver.interrupts


def test_a_reply_spread_over_several_buffers(driver):
    mount(driver)
    rpc(driver, m.Twalk(2, 0, 1, (b"hello",)))
    rpc(driver, m.Tlopen(3, 1, m.L_RDONLY))
    assert rpc(driver, m.Tread(4, 1, 6, 100), in_sizes=(5, 3, 100)) == m.Rread(4, b"from the host")


@pytest.mark.parametrize("pages", [3, 40])
def test_zero_copy_reads_land_in_the_data_pages(driver, share, pages):
    """Linux's zero-copy Tread: an 11-byte buffer for Rread's header, then the data pages."""
    data = os.urandom(pages * PAGE - 100)
    (share / "big").write_bytes(data)
    mount(driver)
    rpc(driver, m.Twalk(2, 0, 1, (b"big",)))
    rpc(driver, m.Tlopen(3, 1, m.L_RDONLY))
    request = m.encode(m.Tread(4, 1, 0, pages * PAGE))
    posted = post(driver, [request], [m.DATA_REPLY_HEADER_SIZE] + [PAGE] * pages, indirect=True)
    (reply,) = replies(driver, [posted])
    assert m.decode_response(reply) == m.Rread(4, data)
    header_address = posted[1][0][0]
    assert driver.memory.read(header_address, 4) == (11 + len(data)).to_bytes(4, "little")


@pytest.mark.parametrize("pages", [2, 30])
def test_zero_copy_writes_come_from_the_data_pages(driver, share, pages):
    """Linux's zero-copy Twrite: the 23-byte header (whose size counts the data), then pages."""
    data = os.urandom(pages * PAGE)
    mount(driver)
    rpc(driver, m.Tlcreate(2, 0, b"written", m.L_RDWR, 0o644, 0))
    message = m.encode(m.Twrite(3, 0, 0, data))
    header, body = message[: m.TWRITE_DATA_OFFSET], message[m.TWRITE_DATA_OFFSET :]
    pieces = [header] + [body[start : start + PAGE] for start in range(0, len(body), PAGE)]
    (reply,) = replies(driver, [post(driver, pieces, [PAGE], indirect=True)])
    assert m.decode_response(reply) == m.Rwrite(3, len(data))
    assert (share / "written").read_bytes() == data


def test_several_requests_in_one_kick_complete_with_their_own_replies(driver):
    mount(driver)
    posted = [
        post(driver, [m.encode(m.Tgetattr(10 + i, 0, m.GETATTR_BASIC))], [256]) for i in range(5)
    ]
    posted.append(post(driver, [m.encode(m.Tclunk(20, 99))], [256]))
    posted.append(post(driver, [b"\x03\x00"], [256]))
    results = [m.decode_response(reply) for reply in replies(driver, posted)]
    assert [reply.tag for reply in results[:5]] == [10, 11, 12, 13, 14]
    assert results[5] == m.Rlerror(20, errno.EBADF)
    assert results[6] == m.Rlerror(m.NOTAG, errno.EINVAL)


def test_a_chain_without_room_for_a_reply_completes_empty(driver, device):
    mount(driver)
    head, _ = post(driver, [m.encode(m.Tclunk(5, 0))], [4])
    driver.kick(0)
    assert [(c.head, c.length) for c in driver.collect(0)] == [(head, 0)]
    assert rpc(driver, m.Tgetattr(6, 0, m.GETATTR_BASIC)).qid.type == m.QT_DIR


def test_a_device_reset_ends_the_session(driver, device):
    mount(driver)
    driver.initialize()
    assert rpc(driver, m.Tgetattr(2, 0, m.GETATTR_BASIC)) == m.Rlerror(2, errno.EPROTO)
    mount(driver)
    assert device.stats()["server"]["fids"] == 1


def test_closing_the_device_closes_the_server(memory, share):
    before = set(os.listdir("/proc/self/fd"))
    device = Virtio9p(memory, "t", Server(str(share)))
    driver = MockDriver(device, memory, 0x1000, 3 << 20)
    driver.initialize()
    mount(driver)
    rpc(driver, m.Twalk(2, 0, 1, (b"hello",)))
    rpc(driver, m.Tlopen(3, 1, m.L_RDONLY))
    device.close()
    assert set(os.listdir("/proc/self/fd")) <= before


def used_index(driver) -> int:
    """How many chains the device has returned so far (the used ring's index)."""
    return driver.memory.read_u16(driver.queues[0].used_ring + 2)


def wait_until(condition, timeout=5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.002)
    return True


class GatedServer:
    """A 9P server stand-in whose requests wait until the test opens their gate: each request's
    first byte names its gate, its reply is that byte."""

    def __init__(self):
        self.gates = {}
        self.lock = threading.Lock()
        self.running = 0
        self.most_running = 0
        self.entered = threading.Semaphore(0)

    def gate(self, key):
        with self.lock:
            return self.gates.setdefault(key, threading.Event())

    def handle(self, readable, writable):
        key = bytes(readable[0][:1])
        with self.lock:
            self.running += 1
            self.most_running = max(self.most_running, self.running)
        self.entered.release()
        try:
            self.gate(key).wait(5)
        finally:
            with self.lock:
                self.running -= 1
        writable[0][:1] = key
        return 1

    def reset(self):
        pass

    def close(self):
        pass

    def stats(self):
        return {}


@pytest.fixture
def gated(memory):
    server = GatedServer()
    device = Virtio9p(memory, "gated", server)
    driver = MockDriver(device, memory, 0x1000, 3 << 20)
    driver.initialize()
    bell = doorbell(device, 0)
    worker = QueueWorker("virtio-9p-test", device.concurrency)
    worker.add(bell)
    worker.start()
    yield server, device, driver
    for gate in list(server.gates.values()):
        gate.set()
    worker.stop()
    bell.close()
    device.close()


def test_requests_run_in_parallel_and_complete_out_of_order(gated):
    server, _, driver = gated
    heads = [driver.post_data(0, [key], [1])[0] for key in (b"a", b"b", b"c")]
    driver.kick(0)
    for _ in heads:  # all three inside the server at once
        assert server.entered.acquire(timeout=5)
    server.gate(b"c").set()
    assert wait_until(lambda: used_index(driver) == 1)
    server.gate(b"b").set()
    assert wait_until(lambda: used_index(driver) == 2)
    server.gate(b"a").set()
    assert wait_until(lambda: used_index(driver) == 3)
    assert [c.head for c in driver.collect(0)] == [heads[2], heads[1], heads[0]]


def test_no_more_requests_than_the_cap_are_in_flight(gated):
    server, device, driver = gated
    keys = [bytes([65 + index]) for index in range(device.concurrency + 2)]
    for key in keys:
        driver.post_data(0, [key], [1])
    driver.kick(0)
    for _ in range(device.concurrency):
        assert server.entered.acquire(timeout=5)
    assert not server.entered.acquire(timeout=0.2), "more requests in flight than the cap"
    assert server.most_running == device.concurrency
    for key in keys:
        server.gate(key).set()
    assert wait_until(lambda: used_index(driver) == len(keys))
    assert server.most_running == device.concurrency


def test_a_request_that_finishes_after_a_reset_is_dropped(gated):
    server, device, driver = gated
    driver.post_data(0, [b"a"], [1])
    driver.kick(0)
    assert server.entered.acquire(timeout=5)
    resetting = threading.Thread(target=device.write_status, args=(0,))
    resetting.start()
    time.sleep(0.05)
    assert resetting.is_alive(), "a reset completes only once the request in flight has"
    server.gate(b"a").set()
    resetting.join(5)
    assert not resetting.is_alive()
    assert used_index(driver) == 0, "a reply pushed into the reset ring"
