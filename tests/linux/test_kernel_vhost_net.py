"""The kernel's vhost-net driven through kvmlet's frontend, with no guest booted.

A tap (IFF_VNET_HDR, 12-byte headers) is vhost-net's backend; a packet socket on the tap's
interface is the host's side of the wire. A frame posted on the hand-made transmit ring comes
out of the interface; a frame sent into the interface lands in a receive buffer behind its
virtio-net header. Then the same through `VhostDevice`: a driver reset stops the rings,
VHOST_RESET_OWNER drops the kernel's state, and the next start (owned anew) transmits again.

Needs /dev/vhost-net and /dev/net/tun (root): the test box's L1 has both built in.
"""

from __future__ import annotations

import fcntl
import os
import socket
import struct
import subprocess
import time

import pytest

from kvmlet.memory import GuestMemory
from kvmlet.vhost.device import VhostDevice
from kvmlet.vhost.frontend import memory_table
from kvmlet.vhost.kernel import KernelVhostNet
from kvmlet.virtio.device import VIRTIO_F_VERSION_1
from kvmlet.virtio.worker import QueueWorker
from tests.helpers.guests import IN_TEST_BOX
from tests.helpers.hand_ring import HandRing, eventfd, wait_for
from tests.helpers.virtio_driver import MockDriver

pytestmark = [
    pytest.mark.linux,
    pytest.mark.skipif(
        not IN_TEST_BOX and not (os.path.exists("/dev/vhost-net") and os.geteuid() == 0),
        reason="needs /dev/vhost-net and root for a tap (the test box has both)",
    ),
]

TUNSETIFF = 0x400454CA
TUNSETVNETHDRSZ = 0x400454D8
IFF_TAP, IFF_NO_PI, IFF_VNET_HDR = 0x0002, 0x1000, 0x4000
ETH_P_ALL = 0x0003
ETHERTYPE = 0x88B5
"""IEEE 802 local experimental: nothing else on the link uses it."""
NET_HEADER = 12
"""struct virtio_net_hdr_v1 (VERSION_1): what vhost-net and the tap exchange before a frame."""
RX, TX = 0, 1


def frame(payload: bytes) -> bytes:
    destination, source = b"\xff" * 6, b"\x02\x00\x00\x00\x00\x01"
    return destination + source + struct.pack(">H", ETHERTYPE) + payload


class Tap:
    """A tap interface, up, with a packet socket watching it."""

    def __init__(self):
        self.fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
        request = struct.pack("16sH22x", b"kvmlettap%d", IFF_TAP | IFF_NO_PI | IFF_VNET_HDR)
        self.name = fcntl.ioctl(self.fd, TUNSETIFF, request)[:16].rstrip(b"\0").decode()
        fcntl.ioctl(self.fd, TUNSETVNETHDRSZ, struct.pack("i", NET_HEADER))
        subprocess.run(["ip", "link", "set", self.name, "up"], check=True)
        self.wire = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        self.wire.bind((self.name, ETH_P_ALL))
        self.wire.settimeout(30)

    def receive(self, payload: bytes) -> None:
        """Wait until a frame carrying `payload` crosses the interface."""
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            data = self.wire.recv(2048)
            if data[12:14] == struct.pack(">H", ETHERTYPE) and data[14:] == payload:
                return
        raise AssertionError(f"no frame with {payload!r} on {self.name}")

    def close(self):
        self.wire.close()
        os.close(self.fd)


@pytest.fixture
def tap():
    made = Tap()
    yield made
    made.close()


@pytest.fixture
def memory():
    ram = GuestMemory.memfd([(0, 4 << 20)])
    yield ram
    ram.close()


def test_vhost_net_carries_frames_both_ways_through_hand_made_rings(memory, tap):
    vhost = KernelVhostNet(tap.fd)
    kicks, calls, errs = ([eventfd(), eventfd()] for _ in range(3))
    try:
        assert not vhost.guest_features() & 1 << 27, "VHOST_NET_F_VIRTIO_NET_HDR is vhost's"
        vhost.set_features(1 << VIRTIO_F_VERSION_1)
        vhost.set_mem_table(memory_table(memory))
        rx, tx = HandRing(memory, 0x10000), HandRing(memory, 0x20000)
        for index, ring in ((RX, rx), (TX, tx)):
            vhost.set_vring_num(index, ring.size)
            vhost.set_vring_base(index, 0)
            vhost.set_vring_addr(index, ring.addresses())
            vhost.set_vring_kick(index, kicks[index])
            vhost.set_vring_call(index, calls[index])
            vhost.set_vring_err(index, errs[index])
        for slot in range(8):
            rx.post(0x100000 + 0x1000 * slot, 0x1000, writable=True)
        vhost.start([RX, TX])

        outgoing = frame(b"from the guest through vhost-net")
        memory.write(0x200000, bytes(NET_HEADER) + outgoing)
        tx.post(0x200000, NET_HEADER + len(outgoing), writable=False)
        os.eventfd_write(kicks[TX], 1)
        tap.receive(b"from the guest through vhost-net")
        wait_for(lambda: tx.used_index() == 1, "the frame taken from the tx ring")

        incoming = frame(b"from the host into the rx ring")
        tap.wire.send(incoming)

        def delivered() -> bool:
            for slot in range(rx.used_index()):
                data = memory.read(0x100000 + 0x1000 * slot, NET_HEADER + len(incoming))
                if data[NET_HEADER:] == incoming and rx.used_length(slot) == len(data):
                    return True
            return False

        wait_for(delivered, "the host's frame in an rx buffer")
        vhost.stop([RX, TX])
        assert vhost.get_vring_base(TX) == 1
        assert vhost.get_vring_base(RX) == rx.used_index()
    finally:
        vhost.close()
        for fd in (*kicks, *calls, *errs):
            os.close(fd)


def test_a_device_reset_resets_the_owner_and_the_next_start_transmits(memory, tap):
    device = VhostDevice(
        memory, KernelVhostNet(tap.fd), name="net", device_id=1, queue_sizes=[64, 64]
    )
    driver = MockDriver(device, memory, 0x10000, 2 << 20)
    worker = QueueWorker("net")
    device.connect_worker(worker)
    worker.start()
    try:
        for attempt in range(2):
            driver.initialize()
            payload = f"transmitted by start {attempt}".encode()
            driver.post_data(TX, [bytes(NET_HEADER) + frame(payload)], [])
            os.eventfd_write(device.kick_eventfd(TX), 1)
            tap.receive(payload)
            device.write_status(0)
            assert device.status == 0 and device.vring_bases[TX] == 1
        assert device.backend_error is None
    finally:
        worker.stop()
        device.close()
