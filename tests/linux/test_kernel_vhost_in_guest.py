"""The kernel's vhost-vsock driven through kvmlet's frontend, with no guest booted.

Rings laid out by hand in memfd guest RAM play the guest's virtio-vsock driver: the host
connects with AF_VSOCK to the "guest" CID, the kernel writes the connection request into a
receive buffer and moves the used ring, our hand-made response on the transmit ring completes
the host's connect(), and data crosses both ways. Then the same through `VhostDevice` and the
mock driver: DRIVER_OK hands the rings to the kernel, a reset takes them back, a second start
works.

Needs /dev/vhost-vsock: the test box's L1 kernel has it built in; elsewhere it skips unless
the vhost_vsock module is loaded.
"""

from __future__ import annotations

import errno
import os
import select
import socket
import struct

import pytest

from kvmlet.memory import GuestMemory
from kvmlet.vhost.device import VhostDevice
from kvmlet.vhost.frontend import VhostError, memory_table
from kvmlet.vhost.kernel import KernelVhostVsock
from kvmlet.virtio.device import VIRTIO_F_VERSION_1, InterruptKind
from kvmlet.virtio.worker import QueueWorker
from tests.helpers.guests import IN_TEST_BOX
from tests.helpers.hand_ring import WAIT, HandRing, eventfd, wait_for
from tests.helpers.virtio_driver import MockDriver

pytestmark = [
    pytest.mark.linux,
    pytest.mark.skipif(
        not IN_TEST_BOX and not os.path.exists("/dev/vhost-vsock"),
        reason="no /dev/vhost-vsock here (modprobe vhost_vsock); the test box has it",
    ),
]

RAM = 4 << 20
HEADER = struct.Struct("<QQIIIHHIII")
"""struct virtio_vsock_hdr: src_cid, dst_cid, src_port, dst_port, len, type, op, flags,
buf_alloc, fwd_cnt (44 bytes, little-endian)."""
TYPE_STREAM = 1
OP_REQUEST, OP_RESPONSE, OP_RW = 1, 2, 5
HOST_CID = 2
RX, TX = 0, 1


def signalled(fd: int) -> bool:
    try:
        return os.eventfd_read(fd) > 0
    except BlockingIOError:
        return False


def packet(src_port: int, dst_port: int, op: int, payload: bytes, cid: int) -> bytes:
    return (
        HEADER.pack(cid, HOST_CID, src_port, dst_port, len(payload), TYPE_STREAM, op, 0, 65536, 0)
        + payload
    )


@pytest.fixture
def memory():
    ram = GuestMemory.memfd([(0, RAM)])
    yield ram
    ram.close()


def free_cid(first: int = 3) -> int:
    """A CID no other vhost-vsock user on this host holds."""
    for cid in range(first, first + 64):
        try:
            probe = KernelVhostVsock(cid)
        except VhostError as error:
            if "address already in use" in str(error):
                continue
            raise
        probe.close()
        return cid
    raise AssertionError("no free vsock CID")


def test_vhost_vsock_moves_a_connection_through_hand_made_rings(memory):
    cid = free_cid()
    vhost = KernelVhostVsock(cid)
    kicks, calls, errs = ([eventfd(), eventfd()] for _ in range(3))
    host = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    try:
        assert vhost.guest_features() >> VIRTIO_F_VERSION_1 & 1
        vhost.set_features(1 << VIRTIO_F_VERSION_1)
        vhost.set_mem_table(memory_table(memory))
        rings = [HandRing(memory, 0x10000), HandRing(memory, 0x20000)]
        for index, ring in enumerate(rings):
            vhost.set_vring_num(index, ring.size)
            vhost.set_vring_base(index, 0)
            vhost.set_vring_addr(index, ring.addresses())
            vhost.set_vring_kick(index, kicks[index])
            vhost.set_vring_call(index, calls[index])
            vhost.set_vring_err(index, errs[index])
        rx, tx = rings
        for slot in range(4):
            rx.post(0x100000 + 0x1000 * slot, 0x1000, writable=True)
        vhost.start([RX])
        assert not vhost.running, "vsock runs both rings or none"
        vhost.start([TX])
        assert vhost.running

        host.setblocking(False)
        port = 5000 + cid
        assert host.connect_ex((cid, port)) == errno.EINPROGRESS
        wait_for(lambda: rx.used_index() == 1, "the connection request in the rx ring")
        assert rx.used_length(0) == HEADER.size
        request = HEADER.unpack(memory.read(0x100000, HEADER.size))
        src_cid, dst_cid, host_port, dst_port, length, kind, op = request[:7]
        assert (src_cid, dst_cid, dst_port, length, kind, op) == (
            HOST_CID,
            cid,
            port,
            0,
            TYPE_STREAM,
            OP_REQUEST,
        )
        wait_for(lambda: signalled(calls[RX]), "the kernel's signal on the rx call eventfd")

        memory.write(0x200000, packet(port, host_port, OP_RESPONSE, b"", cid))
        tx.post(0x200000, HEADER.size, writable=False)
        os.eventfd_write(kicks[TX], 1)
        wait_for(lambda: tx.used_index() == 1, "the response taken from the tx ring")
        assert select.select([], [host], [], WAIT)[1], "the host's connect() completes"
        assert host.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0

        host.send(b"ping from the host")
        wait_for(lambda: rx.used_index() >= 2, "the host's data in the rx ring")
        data = memory.read(0x101000, HEADER.size + 18)
        assert HEADER.unpack(data[: HEADER.size])[6] == OP_RW
        assert data[HEADER.size :] == b"ping from the host"

        memory.write(0x201000, packet(port, host_port, OP_RW, b"pong from the guest", cid))
        tx.post(0x201000, HEADER.size + 19, writable=False)
        os.eventfd_write(kicks[TX], 1)
        assert select.select([host], [], [], WAIT)[0]
        assert host.recv(64) == b"pong from the guest"

        vhost.stop([RX, TX])
        assert not vhost.running
        assert vhost.get_vring_base(TX) == 2
        assert vhost.get_vring_base(RX) == rx.used_index()
    finally:
        host.close()
        vhost.close()
        for fd in (*kicks, *calls, *errs):
            os.close(fd)


def wait_for_request(driver: MockDriver, buffers: dict, cid: int, port: int) -> None:
    """Collect rx completions until the host's connection request for `port` is among them."""
    received = []

    def arrived() -> bool:
        for completion in driver.collect(RX):
            (address,) = buffers[completion.head]
            received.append(HEADER.unpack(driver.memory.read(address, HEADER.size)))
        return any(h[1] == cid and h[3] == port and h[6] == OP_REQUEST for h in received)

    wait_for(arrived, f"the request for port {port} in the rx ring")


def test_vhost_device_hands_its_rings_to_the_kernel_and_takes_them_back(memory):
    cid = free_cid()
    device = VhostDevice(
        memory,
        KernelVhostVsock(cid),
        name="vsock",
        device_id=19,
        queue_sizes=[64, 64, 64],
        backend_queues=2,
        config=cid.to_bytes(8, "little"),
    )
    driver = MockDriver(device, memory, 0x10000, 2 << 20)
    worker = QueueWorker("vsock")
    device.connect_worker(worker)
    worker.start()
    try:
        for port in (6000, 6001):
            driver.initialize()
            assert device.running and device.frontend.running
            buffers = dict(driver.post_data(RX, [], [4096]) for _ in range(4))
            os.eventfd_write(device.kick_eventfd(RX), 1)
            with socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM) as host:
                host.setblocking(False)
                assert host.connect_ex((cid, port)) == errno.EINPROGRESS
                wait_for_request(driver, buffers, cid, port)
                wait_for(
                    lambda: (InterruptKind.QUEUE, RX) in driver.interrupts,
                    "the kernel's call relayed as the rx queue's interrupt",
                )
                assert device.stats()["queues"][RX]["requests"] == 0, "Python popped nothing"
                device.write_status(0)
            assert device.status == 0 and not device.frontend.running
            used_index = memory.read_u16(driver.queues[RX].used_ring + 2)
            assert device.vring_bases[RX] == used_index >= 1
            driver.interrupts.clear()
        assert device.backend_error is None
    finally:
        worker.stop()
        device.close()
